"""The standard handlers served in a user's scope: under aiohttp's debug checks, and never the instance-only ones."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp import web, web_urldispatcher

from support.cluster import Cluster, png_bytes


@pytest.fixture
def aiohttp_debug_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``python -X dev`` turns on in aiohttp's router (it refuses a ``current_app`` it does not serve)."""
    monkeypatch.setattr(web_urldispatcher, "DEBUG", True)


async def test_a_users_shared_routes_work_with_aiohttp_debug_checks(aiohttp_debug_checks, start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=0)
    (cluster.data_dir / "input" / "shared.png").write_bytes(png_bytes())
    alice = cluster.http("alice")
    form = aiohttp.FormData()
    form.add_field("image", png_bytes(), filename="cat.png", content_type="image/png")
    response = await alice.post("/upload/image", data=form)
    assert response.status == 200, await response.text()
    assert (cluster.user_dir("alice") / "input" / "cat.png").is_file()
    assert (await alice.get("/view", params={"filename": "cat.png", "type": "input"})).status == 200
    # A miss in alice's input falls back to the public DIR/input.
    assert (await alice.get("/view", params={"filename": "shared.png", "type": "input"})).status == 200
    response = await alice.post("/userdata/workflows%2Fa.json", data=b"{}")
    assert response.status == 200, await response.text()
    assert (cluster.user_dir("alice") / "user" / "default" / "workflows" / "a.json").is_file()
    assert (await alice.post("/settings/Comfy.Theme", json="dark")).status == 200
    assert await (await alice.get("/settings")).json() == {"Comfy.Theme": "dark"}
    assert await (await cluster.http("bob").get("/settings")).json() == {}
    assert await (await alice.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
    assert (await (await alice.get("/jobs")).json())["jobs"] == []
    assert (await alice.get("/internal/files/input")).status == 200
    assert "max_upload_size" in await (await alice.get("/features")).json()


async def test_instance_only_handlers_refuse_a_scoped_request(aiohttp_client, data_dir: Path) -> None:
    """A handler that drives the engine is never run on a stand-in: a scope that reaches one is a 500."""
    from cluster_proxy.scope import Scopes
    from standard.datadir import init_data_dir
    from standard.server import routes_prompt
    from standard.server.context import SCOPE
    from standard.settings import StandardSettings

    dirs = init_data_dir(data_dir)
    scopes = Scopes(StandardSettings(data_dir=data_dir), dirs, store=None, workdirs_of=lambda user: dirs.workdirs())  # type: ignore[arg-type]

    @web.middleware
    async def in_a_scope(request: web.Request, handler):  # type: ignore[no-untyped-def]
        request[SCOPE] = scopes.for_user("alice")
        return await handler(request)

    app = web.Application(middlewares=[in_a_scope])
    app.router.add_post("/interrupt", routes_prompt.post_interrupt)
    app.router.add_get("/queue", routes_prompt.get_queue)
    client = await aiohttp_client(app)
    assert (await client.post("/interrupt", json={})).status == 500
    assert await (await client.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
