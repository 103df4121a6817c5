"""Rolling restart of the pool (``POST /restart`` in the cluster edition): admins only.

Each instance is drained, restarted (re-importing ``DIR/custom_nodes``) and rejoins, one at a
time, while the queue keeps running: every queued task finishes, and a plugin dropped into
``DIR/custom_nodes`` is in the node list afterwards. Other users are refused with a clear message.
"""

from __future__ import annotations

from test_access_guard_editions import browser, cluster_login

from standard.guard import AccessPolicy
from support.access import EVIL_ORIGINS
from support.cluster import graph
from support.wait import until

NEW_PLUGIN = '''
class ComfyserveFreshNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, image):
        return (image,)


NODE_CLASS_MAPPINGS = {"ComfyserveFreshNode": ComfyserveFreshNode}
'''


async def test_rolling_restart_reloads_plugins_and_loses_no_work(start_cluster) -> None:
    cluster = await start_cluster(instances=2, users=("root", "alice"), admin="root")
    alice = cluster.user("alice")
    async with cluster.http("alice") as alice_http:
        assert "ComfyserveFreshNode" not in await (await alice_http.get("/object_info")).json()
    (cluster.data_dir / "custom_nodes" / "fresh_node.py").write_text(NEW_PLUGIN)
    queued = [await alice.submit(graph(f"r{n}", color=100 + n, seconds=0.3)) for n in range(5)]
    async with cluster.http("root") as root:
        resp = await root.post("/restart")
        assert resp.status == 202 and "none is lost" in (await resp.json())["message"]
        again = await root.post("/restart")
        assert again.status == 409 and "already under way" in (await again.json())["error"]["message"]
        await until(lambda: not cluster.core.restart.running, timeout_s=60, what="the rolling restart ended")
        status = await (await root.get("/restart")).json()
        assert sorted(status["done"]) == sorted(cluster.pool.instances) and status["failed"] == {}
    for prompt_id in queued:
        await until(lambda p=prompt_id: alice.history_entry(p), timeout_s=60, what="every queued task finished")
        assert (await alice.history_entry(prompt_id))["status"]["status_str"] == "success"
    await until(lambda: len(cluster.pool.up()) == 2, what="both instances rejoined")
    async with cluster.http("alice") as alice_http:
        assert "ComfyserveFreshNode" in await (await alice_http.get("/object_info")).json()


async def test_restart_is_refused_to_users_with_a_clear_message(start_cluster) -> None:
    cluster = await start_cluster(instances=1, users=("root", "alice"), admin="root",
                                  access=AccessPolicy.build(allowed_hosts=["127.0.0.1"]))
    async with cluster.http("alice") as alice:
        for path in ("/restart", "/api/restart"):
            resp = await alice.post(path)
            assert resp.status == 403
            assert "Only an admin can restart the pool" in (await resp.json())["error"]["message"]
        assert (await alice.get("/restart")).status == 403
    async with cluster.http(None) as anonymous:
        assert (await anonymous.post("/restart")).status == 401
        assert (await anonymous.post("/restart", headers={"Authorization": "Bearer nope"})).status == 401
    async with cluster.http("root") as root:
        assert (await root.post("/restart", headers={"Host": "evil.example"})).status == 421
    async with browser() as session:
        assert (await cluster_login(session, cluster.url)).status == 302  # alice's session
        for origin in EVIL_ORIGINS:
            assert (await session.post(cluster.url + "/restart", headers={"Origin": origin})).status == 403
    assert not cluster.core.restart.running
