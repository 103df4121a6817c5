"""The same access rules on the cluster proxy, the API front, the queue service and the CLI flags."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from queue_service.server import create_app as create_queue_app
from queue_service.settings import QueueSettings
from standard.guard import AccessPolicy
from standard.ports import free_port
from support.access import BAD_NEXTS, EVIL_ORIGINS
from support.cluster import PASSWORD
from support.processes import START_TIMEOUT_S, VENV_BIN, start_cli, stop_cli, wait_for_port

COOKIE = "comfyserve_cluster_session"


async def cluster_login(session: aiohttp.ClientSession, url: str, next_path: str = "/dashboard") -> Any:
    return await session.post(url + "/login", data={"name": "alice", "password": PASSWORD, "next": next_path},
                              headers={"Origin": url}, allow_redirects=False)


def browser() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies for 127.0.0.1


# -- cluster ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", BAD_NEXTS)
async def test_cluster_login_never_redirects_off_site(start_cluster, target: str) -> None:
    cluster = await start_cluster(instances=0, users=("alice",))
    async with browser() as session:
        resp = await cluster_login(session, cluster.url, target)
        assert resp.status == 302 and resp.headers["Location"] == "/"


@pytest.mark.parametrize("origin", EVIL_ORIGINS)
async def test_cluster_cookie_refused_from_other_and_opaque_origins(start_cluster, origin: str) -> None:
    cluster = await start_cluster(instances=0, users=("alice",))
    async with browser() as session:
        assert (await cluster_login(session, cluster.url)).status == 302
        resp = await session.post(cluster.url + "/interrupt", headers={"Origin": origin})
        assert resp.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(cluster.url + "/ws?clientId=x", headers={"Origin": origin})
        assert info.value.status == 403
        ws = await session.ws_connect(cluster.url + "/ws?clientId=x", headers={"Origin": cluster.url})
        await ws.close()


async def test_cluster_checks_host_only_when_told_its_names(start_cluster) -> None:
    cluster = await start_cluster(instances=0, users=("alice",), access=AccessPolicy.build(allowed_hosts=["comfy.lan"]))
    async with cluster.http("alice") as session:
        assert (await session.get("/queue", headers={"Host": "comfy.lan"})).status == 200
        resp = await session.get("/queue", headers={"Host": "attacker.example"})
        assert resp.status == 421 and (await resp.json())["error"]["type"] == "misdirected_request"
        assert (await session.get("/healthz", headers={"Host": "attacker.example"})).status == 200


async def test_cluster_session_cookie_secure_behind_a_trusted_https_proxy(start_cluster) -> None:
    cluster = await start_cluster(instances=0, users=("alice",), access=AccessPolicy.build(secure_cookies=True))
    async with browser() as session:
        resp = await cluster_login(session, cluster.url)
        assert resp.status == 302 and resp.cookies[COOKIE]["secure"]


# -- API front and queue service without a token ------------------------------------------------------------


async def test_api_front_without_token_refuses_rebound_host_and_opaque_origin(api) -> None:
    live = await api(token=None)
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        ok = await http.post("/api_prompt", content=b"{}", headers={"Host": f"localhost:{live.port}"})
        assert ok.status_code != 421 and ok.status_code != 403
        rebound = f"attacker.example:{live.port}"
        resp = await http.post("/api_prompt", content=b"{}", headers={"Host": rebound, "Origin": f"http://{rebound}"})
        assert resp.status_code == 421
        resp = await http.post("/api_prompt", content=b"{}", headers={"Origin": "null"})
        assert resp.status_code == 403
        resp = await http.post("/api/predict/svc", content=b"x", headers={"Origin": "file://"})
        assert resp.status_code == 403


async def test_queue_without_token_refuses_rebound_host_and_opaque_origin(aiohttp_client: Any,
                                                                          tmp_path: Path) -> None:
    client = await aiohttp_client(create_queue_app(QueueSettings(sqlite_path=tmp_path / "q.sqlite3")))
    assert (await client.post("/api/predict/svc", data=b"x")).status == 200
    assert (await client.post("/api/predict/svc", data=b"x", headers={"Host": "attacker.example"})).status == 421
    assert (await client.post("/api/predict/svc", data=b"x", headers={"Origin": "null"})).status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/api/predict/svc?_watch_=true", headers={"Host": "attacker.example"})
    assert info.value.status == 421


# -- flags ----------------------------------------------------------------------------------------------


def test_allowed_hosts_from_the_environment_and_a_short_token_warning(tmp_path: Path,
                                                                      cli_env: dict[str, str]) -> None:
    port = free_port()
    env = {**cli_env, "COMFYSERVE_ALLOWED_HOST": "comfy.lan,box.lan"}
    proc = start_cli([str(VENV_BIN / "comfyserve"), "standard", "--port", str(port), "--data-dir", str(tmp_path / "d"),
                   "--token", "Zq9"], env)
    try:
        wait_for_port(port, START_TIMEOUT_S, proc)
        base = f"http://127.0.0.1:{port}"
        for host, status in (("comfy.lan", 200), ("box.lan", 200), ("attacker.example", 421)):
            resp = httpx.get(f"{base}/queue", headers={"Host": host, "Authorization": "Zq9"})
            assert resp.status_code == status, host
    finally:
        code, _, err = stop_cli(proc)
    assert code == 0, err
    assert "the token has only 3 characters" in err and "Zq9" not in err


def test_a_bad_trusted_proxy_exits_2(tmp_path: Path, cli_env: dict[str, str]) -> None:
    for role in ("standard", "cluster", "api", "queue"):
        result = subprocess.run([str(VENV_BIN / "comfyserve"), role, "--data-dir", str(tmp_path / "d"),
                                 "--trusted-proxy", "not-an-address"],
                                env=cli_env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (role, result.stderr)
        assert "--trusted-proxy must be an IP address or network" in result.stderr, role


async def test_cluster_slows_wrong_user_tokens_per_address(start_cluster) -> None:  # noqa: F811
    cluster = await start_cluster(instances=0, users=("alice",))
    right = {"Authorization": f"Bearer {cluster.tokens['alice']}"}
    async with aiohttp.ClientSession() as guesser:
        statuses = [(await guesser.get(cluster.url + "/queue", headers={"Authorization": f"Bearer csu_{i}"})).status
                    for i in range(10)]
        assert statuses == [401] * 10
        slowed = await guesser.get(cluster.url + "/queue", headers=right)
        assert slowed.status == 429 and int(slowed.headers["Retry-After"]) >= 1
    # alice at another address is not locked out by the guesser
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as alice:
        assert (await alice.get(cluster.url + "/queue", headers=right)).status == 200
