"""The two real-ComfyUI runtimes behind the proxy: a URL, or a supervised child.

Both satisfy ``Backend``: the proxy asks ``base_url`` per request (a child
gets a new port on each start), ``/readyz`` asks ``status()``, ``/restart``
calls ``restart()``.
"""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp

PROBE_PATH = "/system_stats"  # cheap, and answered by ComfyUI and comfyserve alike
PROBE_TIMEOUT_S = 3.0


class Backend(Protocol):
    """What the proxy needs from a runtime."""

    kind: str

    @property
    def base_url(self) -> str | None:
        """Where to send requests now; None while there is nowhere (child starting)."""

    @property
    def starts(self) -> int:
        """How many times this runtime started ComfyUI (each restart, on purpose or after a crash, counts):
        a change means ComfyUI forgot its queue and history. 0 for one it does not start."""

    async def start(self, session: aiohttp.ClientSession) -> None: ...

    async def stop(self) -> None: ...

    async def status(self) -> dict[str, Any]:
        """``{"ready": bool, ...}`` for ``/readyz``."""

    async def restart(self) -> dict[str, Any] | None:
        """Restart the runtime; None when the backend's own ``/restart`` should be proxied."""

    async def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Until ``base_url`` is set again (a child starting or restarting), at most ``timeout_s``."""


async def probe(session: aiohttp.ClientSession, base_url: str) -> tuple[bool, str]:
    """Whether ComfyUI at ``base_url`` answers HTTP; (ok, detail)."""
    try:
        async with session.get(base_url + PROBE_PATH, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
                               allow_redirects=False) as response:
            await response.read()
            if response.status == 200:
                return True, "ok"
            return False, f"{PROBE_PATH} answered HTTP {response.status}"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return False, f"unreachable: {exc!r}"


class RemoteBackend:
    """``--backend-url``: a ComfyUI (or comfyserve) instance that runs elsewhere."""

    kind = "comfyui-url"
    starts = 0  # it restarts without us: the journal's socket to it tells (``continuity``)

    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    @property
    def base_url(self) -> str | None:
        return self._url

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def stop(self) -> None:
        self._session = None

    async def status(self) -> dict[str, Any]:
        assert self._session is not None
        ok, detail = await probe(self._session, self._url)
        return {"ready": ok, "runtime": self.kind, "backend": self._url, "error": None if ok else detail}

    async def restart(self) -> dict[str, Any] | None:
        return None  # the backend restarts itself if it can (comfyserve does)

    async def wait_ready(self, timeout_s: float | None = None) -> bool:
        return True  # always addressable; whether it answers is the request's business
