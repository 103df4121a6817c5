"""The suite's own plumbing: httpx clients of the test process share one default SSL context
(``support.ssl_context``), so a client per request does not parse a CA bundle per request."""

from __future__ import annotations

import httpx


def _context(client: httpx.AsyncClient) -> object:
    return client._transport._pool._ssl_context  # type: ignore[attr-defined]


async def test_default_clients_share_one_ssl_context_and_others_keep_their_own() -> None:
    async with httpx.AsyncClient(trust_env=False) as one, httpx.AsyncClient(trust_env=False) as two, \
            httpx.AsyncClient(trust_env=False, verify=False) as unverified:
        assert _context(one) is _context(two)
        assert _context(unverified) is not _context(one)
        assert _context(unverified).verify_mode.name == "CERT_NONE"  # type: ignore[attr-defined]
