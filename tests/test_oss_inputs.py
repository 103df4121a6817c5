"""Inputs of an ``oss://`` data dir (the OSS test server, the real oss2 SDK): ``PREFIX/input`` is
listed at start and refreshed, its images show in LoadImage's choices, and each is fetched into the
local ``input/`` on first use - so an image uploaded through another instance, or put into the
bucket directly, loads on this one. Keys that would leave ``input/`` are ignored."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from oss_server.fixtures import BUCKET, storage_settings
from PIL import Image

from standard.server import keys
from standard.server.app import create_embedded_app
from standard.server.storage_web import STORAGE
from standard.settings import StandardSettings
from support.clock import FakeClock
from support.server import png_bytes, wait_history

TTL_S = 0.2


@pytest.fixture
def oss_instance(aiohttp_client: Any, oss, tmp_path: Path):
    """Instances on oss://BUCKET/data, each with its own local disk (as on separate machines)."""
    async def factory(name: str, **overrides: Any):
        storage = storage_settings(oss, tmp_path / name, **{"input_list_ttl_s": TTL_S, **overrides})
        return await aiohttp_client(create_embedded_app(StandardSettings(data_dir=storage.local_root,
                                                                         storage=storage)))

    return factory


def load_graph(image: str, prefix: str = "loaded") -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


async def upload(client: Any, data: bytes, filename: str, subfolder: str = "") -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("image", data, filename=filename, content_type="image/png")
    form.add_field("subfolder", subfolder)
    return await (await client.post("/upload/image", data=form)).json()


async def image_choices(client: Any) -> list[str]:
    info = await (await client.get("/object_info/LoadImage")).json()
    return info["LoadImage"]["input"]["required"]["image"][0]


async def choices_until(client: Any, predicate: Callable[[list[str]], bool], timeout_s: float = 10.0) -> list[str]:
    """Ask /object_info until LoadImage's choices satisfy ``predicate`` (the listing refreshes in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        choices = await image_choices(client)
        if predicate(choices) or loop.time() > deadline:
            return choices
        await asyncio.sleep(0.05)


async def run(client: Any, graph: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post("/prompt", json={"prompt": graph})
    body = await resp.json()
    assert resp.status == 200, body
    return await wait_history(client, body["prompt_id"])


def listing_requests(oss) -> int:
    """ListObjects calls the test server answered (a GET on the bucket itself)."""
    return sum(1 for method, _bucket, key in oss.server.requests if method == "GET" and key == "")


def local_input(client: Any, rel: str) -> Path:
    return client.app[keys.SETTINGS].data_dir / "input" / rel


def saved_pixels(client: Any, entry: dict[str, Any]) -> np.ndarray:
    image = entry["outputs"]["2"]["images"][0]
    path = client.app[keys.SETTINGS].data_dir / "output" / image["subfolder"] / image["filename"]
    return np.asarray(Image.open(path).convert("RGBA"))


async def test_an_upload_through_one_instance_loads_on_another(oss_instance, oss) -> None:
    a = await oss_instance("a")
    b = await oss_instance("b")
    picture = png_bytes(size=(5, 3), color=(10, 200, 30, 255))
    assert await upload(a, picture, "shared.png", "team") == {"name": "shared.png", "subfolder": "team",
                                                               "type": "input"}
    assert oss.server.get(BUCKET, "data/input/team/shared.png") == picture
    assert not local_input(b, "team/shared.png").exists()

    choices = await choices_until(b, lambda c: "team/shared.png" in c)
    assert "team/shared.png" in choices  # listed, not downloaded
    assert not local_input(b, "team/shared.png").exists()

    entry = await run(b, load_graph("team/shared.png"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert local_input(b, "team/shared.png").read_bytes() == picture  # fetched into B's mirror
    pixels = saved_pixels(b, entry)
    assert pixels.shape == (3, 5, 4) and tuple(pixels[0, 0]) == (10, 200, 30, 255)

    # A third machine shows it through /view (fetched into its mirror, subfolder kept).
    c = await oss_instance("c")
    view = await c.get("/view", params={"filename": "shared.png", "subfolder": "team", "type": "input"},
                       allow_redirects=False)
    assert view.status == 200 and await view.read() == picture
    assert local_input(c, "team/shared.png").read_bytes() == picture

    # A, where the upload happened, loads it from its local disk as before.
    gets = sum(1 for m, _b, k in oss.server.requests if m == "GET" and k == "data/input/team/shared.png")
    entry = await run(a, load_graph("team/shared.png"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert sum(1 for m, _b, k in oss.server.requests if m == "GET" and k == "data/input/team/shared.png") == gets


async def test_an_object_put_into_the_bucket_shows_up_after_the_refresh(oss_instance, oss) -> None:
    client = await oss_instance("a")
    storage = client.app[STORAGE]
    assert "direct.png" not in await image_choices(client)
    oss.server.put(BUCKET, "data/input/direct.png", png_bytes(color=(1, 2, 3, 255)))
    oss.server.put(BUCKET, "data/input/notes.txt", b"not an image")

    # A burst of node-list requests once the listing is stale costs one listing, not one per request.
    storage.inputs.clock = clock = FakeClock(time.monotonic())
    clock.advance(TTL_S)
    refreshes, listings = storage.inputs.refreshes, listing_requests(oss)
    await asyncio.gather(*(image_choices(client) for _ in range(30)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while storage.inputs.refreshes == refreshes:
        assert loop.time() < deadline, "no refresh after the listing went stale"
        await asyncio.sleep(0.01)
    assert listing_requests(oss) - listings == 1
    choices = await choices_until(client, lambda c: "direct.png" in c)
    assert "direct.png" in choices and "notes.txt" not in choices

    # /view of the input fetches it into the local mirror and serves it (no redirect).
    view = await client.get("/view", params={"filename": "direct.png", "type": "input"}, allow_redirects=False)
    assert view.status == 200 and await view.read() == png_bytes(color=(1, 2, 3, 255))
    assert local_input(client, "direct.png").is_file()
    # No download bookkeeping (locks, parts, index) shows among the user's input files.
    assert await (await client.get("/internal/files/input")).json() == ["direct.png"]
    missing = await client.get("/view", params={"filename": "absent.png", "type": "input"},
                               allow_redirects=False)
    assert missing.status == 404


async def test_an_input_deleted_locally_is_fetched_again_on_use(oss_instance, oss) -> None:
    client = await oss_instance("a")
    await upload(client, png_bytes(), "again.png")
    path = local_input(client, "again.png")
    assert (await run(client, load_graph("again.png")))["status"]["status_str"] == "success"
    path.unlink()
    await choices_until(client, lambda c: "again.png" in c)  # the bucket still lists it
    assert "again.png" in await image_choices(client)
    entry = await run(client, load_graph("again.png", prefix="second"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert path.read_bytes() == png_bytes()


async def test_traversal_keys_in_the_bucket_are_ignored(oss_instance, oss, caplog, tmp_path) -> None:
    for key in ("data/input/../escape.png", "data/input//abs.png", "data/input/sub/../../../up.png"):
        oss.server.put(BUCKET, key, png_bytes())
    oss.server.put(BUCKET, "data/input/sub/fine.png", png_bytes())
    with caplog.at_level(logging.WARNING, logger="comfyserve.storage"):
        client = await oss_instance("a")
        choices = await image_choices(client)
    assert "sub/fine.png" in choices
    assert not [c for c in choices if ".." in c or c.startswith("/") or c.endswith(("escape.png", "abs.png"))]
    skipped = [r.getMessage() for r in caplog.records if "leaves" in r.getMessage()]
    assert any("../escape.png" in m for m in skipped) and any("//abs.png" in m for m in skipped), skipped
    graph = load_graph("../escape.png")
    resp = await client.post("/prompt", json={"prompt": graph})
    assert resp.status == 400  # not a choice, and never fetched
    entry = await run(client, load_graph("sub/fine.png"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    written = {p.name for p in tmp_path.rglob("*.png")}
    assert not written & {"escape.png", "abs.png", "up.png"}


def test_a_fetched_input_follows_a_newer_version_in_the_bucket(oss, tmp_path: Path) -> None:
    from standard.storage.storage import ObjectStorage

    settings = storage_settings(oss, tmp_path)
    oss.server.put(BUCKET, "data/input/v.png", png_bytes(color=(1, 1, 1, 255)))
    storage = ObjectStorage(settings, settings.local_root)
    storage.prepare()
    path = storage.input_root / "v.png"
    assert storage.input_names() == ["v.png"] and not path.exists()
    assert storage.input_path(path) == path and path.read_bytes() == png_bytes(color=(1, 1, 1, 255))
    oss.server.put(BUCKET, "data/input/v.png", png_bytes(color=(2, 2, 2, 255)))
    storage.inputs.refresh()
    assert storage.input_path(path) == path and path.read_bytes() == png_bytes(color=(2, 2, 2, 255))
    # A local file the bucket never had (or that we did not fetch) is left as it is.
    (storage.input_root / "mine.png").write_bytes(b"local")
    assert storage.input_path(storage.input_root / "mine.png") == storage.input_root / "mine.png"
    assert storage.input_path(storage.input_root / "gone.png") is None
    assert storage.input_path(tmp_path / "elsewhere.png") is None
    assert Image.open(io.BytesIO(path.read_bytes())).size == (8, 6)


def test_input_list_ttl_flag_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    from standard.command import add_arguments, settings_from_args
    from standard.storage.settings import instance_flags

    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "secret")
    monkeypatch.setenv("COMFYSERVE_INPUT_LIST_TTL", "2.5")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--data-dir", "oss://bkt-1/p", "--oss-endpoint", "http://127.0.0.1:9", "--cache-dir", str(tmp_path)]
    storage = settings_from_args(parser.parse_args(base)).storage
    assert storage.input_list_ttl_s == 2.5
    assert settings_from_args(parser.parse_args(instance_flags(storage))).storage == storage  # handed on
    assert settings_from_args(parser.parse_args([*base, "--input-list-ttl", "0"])).storage.input_list_ttl_s == 0


def noise_png(side: int, seed: int) -> bytes:
    """An incompressible PNG (several download parts at the tests' 256 KiB part size)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 4), dtype=np.uint8), "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


async def test_a_dropped_download_resumes_and_a_failing_one_is_the_nodes_error(oss_instance, oss) -> None:
    big = noise_png(400, 3)
    assert len(big) > 2 * 256 * 1024
    oss.server.put(BUCKET, "data/input/big.png", big)
    oss.server.put(BUCKET, "data/input/broken.png", png_bytes())
    client = await oss_instance("a")
    oss.server.faults.drop("big.png", after_bytes=100_000)
    entry = await run(client, load_graph("big.png"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert ("drop", "GET", "data/input/big.png") in oss.server.faults.fired
    assert local_input(client, "big.png").read_bytes() == big  # verified before it took the name

    oss.server.faults.fail("HEAD", "broken.png", times=1000)
    entry = await run(client, load_graph("broken.png"))
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert "broken.png" in error["exception_message"] and "500" in error["exception_message"], error
    assert not local_input(client, "broken.png").exists()


async def test_node_lists_keep_answering_while_the_bucket_listing_fails(oss_instance, oss, caplog) -> None:
    oss.server.put(BUCKET, "data/input/known.png", png_bytes())
    client = await oss_instance("a")
    storage = client.app[STORAGE]
    oss.server.faults.fail("GET", "", times=1000)  # every GET, listings included
    refreshes = storage.inputs.refreshes
    storage.inputs.clock = clock = FakeClock(time.monotonic())
    with caplog.at_level(logging.WARNING, logger="comfyserve.storage"):
        clock.advance(TTL_S)
        assert "known.png" in await image_choices(client)  # the last listing, at once
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not any("refreshing the listing" in r.getMessage() for r in caplog.records):
            assert loop.time() < deadline, "the failed refresh was not logged"
            assert "known.png" in await image_choices(client)
            await asyncio.sleep(0.05)
    assert storage.inputs.refreshes == refreshes  # no listing completed, the old one kept
    oss.server.faults.clear()
