"""Optional per-task webhook: POST the result JSON to the task's ``webhook`` URL.

Signed with ``X-Comfyserve-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
and ``X-Comfyserve-Timestamp`` so a receiver can reject forgeries and replays.
Retried with exponential backoff; the sink result stays the source of truth,
so a webhook that keeps failing is only counted and logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx

log = logging.getLogger("comfyserve.api.webhook")

SIGNATURE_HEADER = "X-Comfyserve-Signature"
TIMESTAMP_HEADER = "X-Comfyserve-Timestamp"
DEFAULT_ATTEMPTS = 5
DEFAULT_BACKOFF_S = 0.5


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """For receivers (and tests): constant-time check of a delivery."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookSender:
    """Delivers in background tasks so a slow receiver never holds up the worker's next task."""

    def __init__(self, secret: str | None, *, attempts: int = DEFAULT_ATTEMPTS,
                 backoff_s: float = DEFAULT_BACKOFF_S, on_give_up: Any = None) -> None:
        self.secret = secret
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.on_give_up = on_give_up
        self._http = httpx.AsyncClient(timeout=10.0, trust_env=False)
        self._tasks: set[asyncio.Task[bool]] = set()

    def send(self, url: str, payload: dict[str, Any]) -> None:
        task = asyncio.create_task(self.deliver(url, payload), name="comfyserve-webhook")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, url: str, payload: dict[str, Any]) -> bool:
        body = json.dumps(payload, separators=(",", ":")).encode()
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp}
            if self.secret:
                headers[SIGNATURE_HEADER] = sign(self.secret, timestamp, body)
            try:
                response = await self._http.post(url, content=body, headers=headers)
                if response.status_code < 300:
                    return True
                reason = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    attempt = self.attempts  # the receiver refuses this delivery: retrying cannot help
            except httpx.HTTPError as exc:
                reason = repr(exc)
            if attempt >= self.attempts:
                log.warning("webhook %s for task %s failed: %s (giving up)", url, payload.get("task_id"), reason)
                break
            log.info("webhook %s failed (%s); retry %d in %.1fs", url, reason, attempt, delay)
            await asyncio.sleep(delay)
            delay *= 2
        if self.on_give_up is not None:
            self.on_give_up()
        return False

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Give pending deliveries a moment, then cancel them."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
        await self._http.aclose()
