"""Picking a port for a child process or a test server: the one helper everything uses."""

from __future__ import annotations

import socket
from collections.abc import Collection


def free_port(host: str = "127.0.0.1", *, avoid: Collection[int] = ()) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's pick), none of ``avoid``.

    ``avoid`` holds ports already promised to someone who has not bound them yet
    (the parent's own listen port, the other children's): the kernel may well
    hand a port out again as soon as its probe socket is closed.
    """
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port
