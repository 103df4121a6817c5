"""An OSS-compatible test server (see ``server``) and a helper that runs it on a loopback thread."""

from __future__ import annotations

from .runner import RunningOssServer, start_in_thread
from .server import Faults, OssTestServer, crc64

__all__ = ["Faults", "OssTestServer", "RunningOssServer", "crc64", "start_in_thread"]
