"""Settings of one standard-edition instance, built from flags and environment in one place."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .guard import AccessPolicy
from .listen import ListenSettings
from .storage.settings import StorageSettings

DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_SIZE_MB = 100.0


@dataclass(frozen=True)
class StandardSettings:
    """Everything an instance needs to start; frozen so it can be shared freely."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    no_auth: bool = False
    max_upload_size_mb: float = DEFAULT_MAX_UPLOAD_SIZE_MB
    # Real-ComfyUI runtime: a checkout to launch as a child, or a URL to front.
    comfyui_dir: Path | None = None
    comfyui_python: str = field(default=sys.executable)
    comfyui_args: tuple[str, ...] = ()
    backend_url: str | None = None
    history_max_items: int = 10000
    # The durable queue and history (standard.state_store); None: in memory only (the CLI always sets it).
    state_file: Path | None = None
    # On SIGTERM: how long the accepted prompts may take to finish before the running one is interrupted.
    shutdown_timeout_s: float = 10.0
    # --data-dir oss://..., --oss-bucket or --output-url-base (standard.storage); None: plain folder.
    storage: StorageSettings | None = None
    # --allowed-host, --trusted-proxy, --secure-cookies (standard.guard)
    access: AccessPolicy = field(default_factory=AccessPolicy)

    @property
    def max_upload_size_bytes(self) -> int:
        return int(self.max_upload_size_mb * 1024 * 1024)

    @property
    def auth_required(self) -> bool:
        return self.token is not None

    @property
    def listen(self) -> ListenSettings:
        return ListenSettings(host=self.host, port=self.port, token=self.token, no_auth=self.no_auth,
                              access=self.access, shutdown_timeout_s=self.shutdown_timeout_s)

    def check(self) -> None:
        """Refuse combinations that must not start (e.g. no token on a public address)."""
        if self.comfyui_dir is not None and self.backend_url is not None:
            raise ConfigError("--comfyui-dir and --backend-url exclude each other")
        self.listen.check()
