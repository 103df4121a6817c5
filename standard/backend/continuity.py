"""Whether ComfyUI is still the process it was: what tells a finished prompt from a forgotten one.

ComfyUI keeps a bounded history (real ComfyUI: 10000 entries), so a prompt of ours that left its queue
and has no history entry either finished and had its entry trimmed before the journal looked, or was
lost when ComfyUI restarted. Only the second may be run again. ``Continuity`` counts *epochs*: spans in
which the front knows ComfyUI did not restart. It holds one WebSocket to ComfyUI's ``/ws`` for as long
as the front runs (ComfyUI's process ending closes every socket it holds), and the epoch advances when

* that socket closes or cannot keep up its heartbeat;
* a request to ComfyUI fails to reach it while the socket is open (``lost``);
* the runtime started ComfyUI again (``Backend.starts``: a supervised child restarted or crashed).

A prompt is *anchored* to the epoch in which ComfyUI was seen holding it (accepted, or in its queue)
while the socket was open; one the journal loaded from its state file, or met while the socket was
closed, is anchored to none. A prompt anchored to the current epoch that left ComfyUI's queue finished
there (or was deleted there directly), whatever ComfyUI's history says now. To keep the prompts met
while the socket is closed few, a prompt accepted then has the socket opened at once (``wanted``), and
the socket's opening has the journal look at once (``on_open``), anchoring those still in ComfyUI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiohttp

from ..retry import RECONNECT
from .runtime import Backend
from .watcher import READY_WAIT_S

log = logging.getLogger("comfyserve.backend")

HEARTBEAT_S = 20.0  # a socket whose far end vanished without closing it is noticed within 1.5 heartbeats


class Continuity:
    """The epoch of ComfyUI as the front sees it, and the socket that keeps it (``follow``)."""

    def __init__(self, backend: Backend, *, on_open: Callable[[], None] = lambda: None) -> None:
        self.backend = backend
        self.on_open = on_open
        self.epoch = 0  # epochs begun so far after the first: the times the front lost sight of ComfyUI
        self._starts = backend.starts
        self._socket: aiohttp.ClientWebSocketResponse | None = None
        self._wanted = asyncio.Event()

    @property
    def up(self) -> bool:
        """The socket to ComfyUI is open: the epoch cannot end without the front noticing."""
        return self._socket is not None and not self._socket.closed

    def current(self) -> int:
        """The epoch now (a restart of ComfyUI by the runtime since the last call ends the one before; its
        first start does not: nothing can be anchored before ComfyUI answers)."""
        starts, before = self.backend.starts, self._starts
        if starts != before:
            self._starts = starts
            if before:
                self._advance("ComfyUI was started again")
        return self.epoch

    def anchor(self) -> int | None:
        """The epoch to anchor a prompt ComfyUI holds now to; None while the front could miss a restart."""
        epoch = self.current()
        return epoch if self.up else None

    def wanted(self) -> None:
        """ComfyUI just accepted a prompt while the socket is closed: open it now, not after the backoff."""
        self._wanted.set()

    def lost(self, reason: str) -> None:
        """A request did not reach ComfyUI: it may have restarted although the socket has not said so yet."""
        if self.up:
            self._advance(reason)

    def _advance(self, reason: str) -> None:
        """End the epoch; said only if the socket was open (its closing said so already otherwise)."""
        self.epoch += 1
        if self.up:
            log.info("journal: lost sight of ComfyUI (%s): a prompt it no longer holds from before is taken "
                     "for forgotten in a restart", reason)

    async def follow(self, session: aiohttp.ClientSession) -> None:
        """Forever (until cancelled): hold the socket to ComfyUI, opened again whenever it closes. It sends
        no credential of ours, as the journal's requests do not; its messages are read and let go. It asks for
        none of the broadcasts (``quiet=1``: our engine then sends it none, ComfyUI ignores the parameter)."""
        failures = 0
        while True:
            base_url = self.backend.base_url
            if base_url is None:
                await self.backend.wait_ready(READY_WAIT_S)
                continue
            try:
                async with session.ws_connect(base_url + "/ws?quiet=1", heartbeat=HEARTBEAT_S, max_msg_size=0,
                                              timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0)
                                              ) as socket:
                    self._socket, failures = socket, 0
                    self.on_open()
                    try:
                        async for message in socket:
                            if message.type == aiohttp.WSMsgType.ERROR:
                                break
                    finally:  # cancelled too: the epoch ends with the socket, said or not
                        self._socket = None
                        self.epoch += 1
                    log.info("journal: lost sight of ComfyUI (its socket closed: code %s): a prompt it no "
                             "longer holds from before is taken for forgotten in a restart", socket.close_code)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.debug("journal: no socket to ComfyUI: %r", exc)
            failures += 1
            self._wanted.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECONNECT.delay_s(failures)):
                    await self._wanted.wait()
