"""What a cluster user must not see: the proxy's secrets, instance URLs, server paths, others' staged inputs."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from standard.ports import free_port
from support.cluster import Cluster, make_users, png_bytes, write_sleep_plugin
from support.processes import environ, wait_for_child, wait_for_port


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_secrets_stay_out_of_responses_and_instance_command_lines(tmp_path: Path,
                                                                        cli_env: dict[str, str]) -> None:
    data_dir = tmp_path / "data"
    write_sleep_plugin(data_dir)
    key, instance_token = "session-key-0123456789abcdef", "remote-instance-token-0123456789"
    port = free_port()
    env = {**cli_env, "COMFYSERVE_INSTANCE_TOKEN": instance_token}
    with (tmp_path / "proxy.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cluster_proxy", "--data-dir", str(data_dir), "--port",
                                 str(port), "--instances", "1", "--secret-key", key],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, timeout_s=30, proc=proc)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/readyz", trust_env=False).json().get("instances_up") != 1:
            assert time.monotonic() < deadline, "the spawned instance never came up"
        tokens = await make_users(data_dir, ("ann", "root"), admin="root")
        async with httpx.AsyncClient(base_url=url, trust_env=False,
                                     headers={"Authorization": f"Bearer {tokens['ann']}"}) as ann:
            stats = await ann.get("/system_stats")
            assert stats.status_code == 200 and stats.json()["system"]["argv"] == ["comfyserve"]
            for secret in (key, instance_token):
                assert secret not in stats.text
        child = wait_for_child(proc.pid, b"standard")
        child_env = environ(child)
        own_token = child_env["COMFYSERVE_TOKEN"]  # the instance's token travels in its environment only
        assert own_token.encode() not in Path(f"/proc/{child}/cmdline").read_bytes()
        assert "COMFYSERVE_INSTANCE_TOKEN" not in child_env and instance_token not in child_env.values()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_only_admins_see_instance_urls_and_server_paths(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=1, users=("alice", "root"), admin="root")
    instance_url = str(cluster.instances[0].make_url("")).rstrip("/")
    alice, root = cluster.http("alice"), cluster.http("root")
    refused = await alice.get("/cluster/instances")
    assert refused.status == 403
    assert instance_url not in await refused.text()
    listed = await (await root.get("/cluster/instances")).json()
    assert [i["url"] for i in listed["instances"]] == [instance_url]
    dashboard = await (await alice.get("/dashboard")).text()
    assert instance_url not in dashboard and "instance 1" in dashboard
    assert instance_url in await (await root.get("/dashboard")).text()
    for prefix in ("", "/api"):
        paths = await (await alice.get(f"{prefix}/internal/folder_paths")).json()
        assert paths["checkpoints"] == ["models/checkpoints"]
        assert str(cluster.data_dir) not in str(paths)
    admin_paths = await (await root.get("/internal/folder_paths")).json()
    assert admin_paths["checkpoints"] == [str(cluster.data_dir / "models" / "checkpoints")]


async def test_the_public_input_fallback_never_serves_staged_inputs(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=0, users=("alice", "bob"))
    staged = cluster.data_dir / "input" / ".cluster" / "bob-task" / "private.png"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(png_bytes())
    (cluster.data_dir / "input" / "public.png").write_bytes(png_bytes())
    (cluster.data_dir / "input" / ".hidden.png").write_bytes(png_bytes())
    alice = cluster.http("alice")
    assert (await alice.get("/view", params={"filename": "public.png", "type": "input"})).status == 200
    for params in ({"filename": "private.png", "subfolder": ".cluster/bob-task", "type": "input"},
                   {"filename": "private.png [input]", "subfolder": ".cluster/bob-task"},
                   {"filename": "private.png", "subfolder": "./.cluster\\bob-task", "type": "input"},
                   {"filename": ".hidden.png", "type": "input"}):
        response = await alice.get("/api/view", params=params)
        assert response.status == 404, params


async def test_files_holding_hashes_prompts_and_keys_are_private(start_cluster) -> None:
    cluster: Cluster = await start_cluster(instances=0, users=("alice",))
    state = cluster.data_dir / ".comfyserve"
    assert mode(state) == 0o700
    for name in ("cluster.sqlite", "cluster_state.sqlite", "secret_key"):
        assert mode(state / name) == 0o600, name
    for path in state.glob("*.sqlite-*"):  # -wal / -shm
        assert mode(path) == 0o600, path
