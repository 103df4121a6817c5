"""Settings of one queue-service process (built from flags and environment in command.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from standard.guard import AccessPolicy

DEFAULT_PORT = 9000
DEFAULT_MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_LENGTH = 100_000
DEFAULT_PENDING_TIMEOUT_S = 30.0
DEFAULT_REDIS_CALL_TIMEOUT_S = 5.0  # the longest a Redis call may take before the service answers 503
MAX_GET_LENGTH = 1000
MAX_WINDOW = 1000
MAX_GET_TIMEOUT_S = 60.0

USER_HEADER = "X-EAS-QueueService-Redis-Uid"
GROUP_HEADER = "X-EAS-QueueService-Redis-Gid"
PRIORITY_HEADER = "X-EAS-QueueService-Priority"
REQUEST_ID_HEADER = "X-Eas-Queueservice-Request-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"  # a put with a key seen recently returns that put's answer
REPLAYED_HEADER = "Idempotent-Replayed"  # "true" on such an answer: nothing was put
# On the upgrade of a watch that asked for ``_prefetch_``: the extensions this service gives it, so a worker
# knows its slots ahead are kept for idle peers and handed back (a service without them serves plain FIFO).
WATCH_EXTENSIONS_HEADER = "X-Comfyserve-Watch"


@dataclass(frozen=True)
class QueueSettings:
    """``sqlite_path`` or ``redis_url`` picks the store (Redis wins when both are set)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    sqlite_path: Path | None = None
    redis_url: str | None = None
    redis_call_timeout_s: float = DEFAULT_REDIS_CALL_TIMEOUT_S
    max_length: int = DEFAULT_MAX_LENGTH
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    pending_timeout_s: float = DEFAULT_PENDING_TIMEOUT_S
    # --allowed-host, --trusted-proxy (standard.guard)
    access: AccessPolicy = field(default_factory=AccessPolicy)
    # SIGTERM: how long requests in flight may take once the watches are closed.
    shutdown_timeout_s: float = 5.0

    @property
    def poll_interval_s(self) -> float:
        """How often a watcher renews its lease and looks for items whose consumer vanished."""
        return max(0.05, min(self.pending_timeout_s / 3, 1.0))
