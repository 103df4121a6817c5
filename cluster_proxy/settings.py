"""Settings of the cluster proxy, built from flags and environment in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standard.errors import ConfigError
from standard.guard import AccessPolicy
from standard.listen import ListenSettings, is_loopback
from standard.serving import DEFAULT_SHUTDOWN_TIMEOUT_S
from standard.settings import DEFAULT_MAX_UPLOAD_SIZE_MB, StandardSettings

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ClusterSettings:
    """Everything the proxy needs; frozen so the modules can share it freely."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # Pool: spawn this many local embedded-engine instances, and/or front these URLs.
    instances: int = 0
    instance_urls: tuple[str, ...] = ()
    instance_token: str | None = None
    redis_url: str | None = None
    secret_key: str | None = None
    max_upload_size_mb: float = DEFAULT_MAX_UPLOAD_SIZE_MB
    health_interval_s: float = 1.0
    # An instance whose event socket stays down this long is taken out (its task retried).
    instance_lost_s: float = 3.0
    object_info_cache_s: float = 30.0
    history_max_items: int = 10000
    # Answer /prompt with ComfyUI's validation errors (see validation.py).
    local_validation: bool = True
    # Args added to every spawned instance (``python -m standard ...``).
    instance_args: tuple[str, ...] = ()
    # An oss:// data dir (or a mounted one with --oss-bucket): users' outputs go to the bucket
    # under PREFIX/users/<name>/output with signed URLs. Typed loosely: no oss2 import without it.
    storage: Any = None
    # Tasks queued on a busy instance behind the one it runs, so it starts the next with no idle gap (0: none).
    prefetch: int = 1
    # Model affinity: a task may be passed over for one whose models an instance holds for this long (0: off);
    # worth several checkpoint loads, or the bound itself forces loads (scheduler.py).
    affinity_wait_s: float = 10.0
    # SIGTERM: how long running tasks may take to finish before they are handed back to the store.
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    # --allowed-host, --trusted-proxy, --secure-cookies (standard.guard)
    access: AccessPolicy = field(default_factory=AccessPolicy)

    @property
    def max_upload_size_bytes(self) -> int:
        return int(self.max_upload_size_mb * 1024 * 1024)

    @property
    def listen(self) -> ListenSettings:
        """Accounts protect the proxy (``logins``): no token, whatever the address."""
        return ListenSettings(host=self.host, port=self.port, logins=True, access=self.access,
                              shutdown_timeout_s=self.shutdown_timeout_s)

    def check(self) -> None:
        self.listen.check()
        if self.instances < 0:
            raise ConfigError("--instances must not be negative")
        if self.prefetch < 0:
            raise ConfigError("--prefetch must not be negative")
        if self.affinity_wait_s < 0:
            raise ConfigError("--affinity-wait must not be negative")
        for url in self.instance_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"--instance-url must be http(s)://host:port, got {url!r}")

    def standard_settings(self) -> StandardSettings:
        """What the reused standard-edition route handlers read (upload limit, data dir)."""
        return StandardSettings(
            data_dir=self.data_dir, host=self.host, port=self.port, token=None,
            no_auth=not is_loopback(self.host), max_upload_size_mb=self.max_upload_size_mb,
        )
