"""One default SSL context for every httpx client of the test process (plugin, registered in conftest).

httpx builds an ``ssl.SSLContext`` for each new client, loading a CA bundle into it: about 17 ms of CPU (45 ms on
the loaded 2-core machine), even for a client that only ever speaks plain HTTP to loopback. The tests open a client
per request in many places (and so do the in-process QueueClient, ApiClient, InstanceClient): over 1,000 clients in
the test_api_* files alone, where half the CPU time of the test process went into parsing the same certificates
again (test_api_task_access, _inputs, _front, _webhooks: 18-21 s before, 9-10 s after). A client asking for the
default context (``verify=True``, no client certificate) gets one built once for its ``trust_env`` and the
``SSL_CERT_FILE``/``SSL_CERT_DIR`` httpx reads with it; any other asks httpx as before. An SSLContext may be shared
by connections (httpcore only sets the ALPN protocols on it, the same ones for every client here: none uses HTTP/2).
Processes the tests start (the roles) are not touched.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

import httpx._transports.default


def pytest_configure() -> None:
    original = httpx._transports.default.create_ssl_context

    @functools.cache
    def default_context(trust_env: bool, cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
        return original(trust_env=trust_env)

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
        if verify is not True or cert is not None:
            return original(verify=verify, cert=cert, trust_env=trust_env)
        # What httpx reads from the environment for the default context is part of the key.
        return default_context(trust_env, os.environ.get("SSL_CERT_FILE") if trust_env else None,
                               os.environ.get("SSL_CERT_DIR") if trust_env else None)

    # httpx's transports look it up in their own module (``from .._config import create_ssl_context``).
    httpx._transports.default.create_ssl_context = create_ssl_context  # type: ignore[assignment]
