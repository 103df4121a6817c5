"""Settings of the API edition's front and workers (built from flags and environment in the commands)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from queue_service.settings import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_PENDING_TIMEOUT_S,
    DEFAULT_REDIS_CALL_TIMEOUT_S,
)
from standard.guard import AccessPolicy
from standard.retry import WEBHOOK, RetryPolicy
from standard.serving import DEFAULT_SHUTDOWN_TIMEOUT_S
from standard.storage.settings import StorageSettings

from .inputs import DEFAULT_INPUT_FETCH_TIMEOUT_S, DEFAULT_INPUT_RETENTION_S, InputLimits
from .outputs import DEFAULT_MAX_INLINE_OUTPUT_BYTES

DEFAULT_PORT = 8000
DEFAULT_SERVICE = "comfyui"
DEFAULT_INSTANCE_DOWN_S = 5.0
DEFAULT_MAX_ATTEMPTS = 3
SINK_SUFFIX = "/sink"
TASK_ID_TAG = "task_id"
WEBHOOK_TAG = "webhook"
MODELS_TAG = "models"  # the task's model files (``standard.model_files.model_key``), put by the front
# One task queued ahead: the instance never waits a round trip between two tasks. A worker that falls idle
# later (or opens its watch late) gets such a task back from a busy one (``queue_service.handback``).
DEFAULT_PREFETCH = 1
DEFAULT_AFFINITY_WAIT_S = 3.0


def sink_of(service: str) -> str:
    """The platform's convention: the output queue of service ``svc`` is ``svc/sink``."""
    return service + SINK_SUFFIX


@dataclass(frozen=True)
class WorkerSettings:
    """One worker: input queue of ``service`` -> the instance at ``instance_url`` -> the sink queue."""

    queue_url: str
    service: str
    instance_url: str
    token: str | None = None  # the queue service's token
    instance_token: str | None = None
    worker_id: str | None = None  # the consumer uid; stable ids let a restarted worker resume its item
    webhook_secret: str | None = None
    instance_down_s: float = DEFAULT_INSTANCE_DOWN_S  # a run is given back after this long unreachable
    run_timeout_s: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # runs cut off mid-task before a task is reported failed (0: no cap)
    webhook_allow: tuple[str, ...] = ()  # webhook URL prefixes; empty: any public address
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S  # SIGTERM: the running task's time to finish
    webhook_retry: RetryPolicy = WEBHOOK  # tries and waits of a delivery (tests record the waits instead)
    data_dir: Path | None = None  # where URL inputs are fetched to (the instance's data dir, shared)
    input_limits: InputLimits = field(default_factory=InputLimits)
    input_url_allow: tuple[str, ...] = ()  # URL input prefixes; empty: any public address
    input_fetch_timeout_s: float = DEFAULT_INPUT_FETCH_TIMEOUT_S
    max_inline_output_bytes: int = DEFAULT_MAX_INLINE_OUTPUT_BYTES  # ?return=base64: sum of a result's bytes
    storage: StorageSettings | None = None  # oss:// data dir: task inputs go to (and from) its bucket
    prefetch: int = DEFAULT_PREFETCH  # tasks queued on the instance behind the running one (0: one at a time)
    affinity_wait_s: float = DEFAULT_AFFINITY_WAIT_S  # how long a task may be passed over for another's models


@dataclass(frozen=True)
class ApiSettings:
    """``comfyserve api``: all-in-one (queue + front + instances + workers) or, with ``queue_url``, a front."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    service: str = DEFAULT_SERVICE
    data_dir: Path | None = None
    queue_url: str | None = None  # a stateless front for a queue service running elsewhere
    redis_url: str | None = None
    redis_call_timeout_s: float = DEFAULT_REDIS_CALL_TIMEOUT_S
    sqlite_path: Path | None = None
    instances: int = 1
    instance_urls: tuple[str, ...] = ()
    instance_token: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    pending_timeout_s: float = DEFAULT_PENDING_TIMEOUT_S
    webhook_secret: str | None = None
    instance_down_s: float = DEFAULT_INSTANCE_DOWN_S
    run_timeout_s: float | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    webhook_allow: tuple[str, ...] = ()
    # /api_prompt: a task_id seen within IDEMPOTENCY_TTL_S answers the first put (as an Idempotency-Key would)
    dedupe_task_id: bool = False
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S  # SIGTERM: the workers' running tasks' time to finish
    webhook_retry: RetryPolicy = WEBHOOK  # tries and waits of a delivery (tests record the waits instead)
    instance_args: tuple[str, ...] = field(default=())  # extra flags for spawned instances
    # --allowed-host, --trusted-proxy (standard.guard)
    access: AccessPolicy = field(default_factory=AccessPolicy)
    input_limits: InputLimits = field(default_factory=InputLimits)  # --max-input-file, --max-input-total
    input_retention_s: float = DEFAULT_INPUT_RETENTION_S  # task input folders left behind go after this
    input_url_allow: tuple[str, ...] = ()
    input_fetch_timeout_s: float = DEFAULT_INPUT_FETCH_TIMEOUT_S
    max_inline_output_bytes: int = DEFAULT_MAX_INLINE_OUTPUT_BYTES
    storage: StorageSettings | None = None  # oss:// data dir: task inputs are uploaded to its bucket
    prefetch: int = DEFAULT_PREFETCH  # the workers' --prefetch
    affinity_wait_s: float = DEFAULT_AFFINITY_WAIT_S  # the workers' --affinity-wait

    @property
    def stateless(self) -> bool:
        return self.queue_url is not None
