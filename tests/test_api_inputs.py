"""The /api_prompt front refuses hostile input before anything is queued."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from PIL import Image

from api_edition.inputs import InputLimits
from support.api import TOKEN, ApiFactory, read_results
from support.server import tiny_graph
from support.wait import until


async def queue_length(live) -> int:
    async with live.input() as queue:
        return int((await queue.attributes())["stream.length"])


async def test_deep_json_and_non_finite_numbers_are_400_and_not_queued(api: ApiFactory) -> None:
    live = await api(max_payload_bytes=1 << 20)
    graph = json.dumps(tiny_graph()).encode()
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                 b"[" + b"[]," * 5000 + b"[" * 200 + b"]" * 200 + b"]",  # deep behind many shallow lists
                 graph.replace(b'"width": 16', b'"width": NaN'), graph.replace(b'"width": 16', b'"width": 1e999'),
                 graph.replace(b'"width": 16', b'"width": -Infinity')):
        assert body != graph
        resp = await live.submit(body, task_id="t")
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["type"] == "invalid_json"
    assert await queue_length(live) == 0


async def test_a_task_id_that_cannot_be_a_header_is_400_before_queuing(api: ApiFactory) -> None:
    live = await api()
    for task_id in ("a\r\nX-Evil: 1", "a\nb", "a\rb", "nul\x00", "bell\x07", "del\x7f", "x" * 257, ""):
        resp = await live.submit(tiny_graph(), task_id=task_id)
        assert resp.status_code == 400, (task_id, resp.text)
        assert resp.json()["error"]["type"] == "bad_request"
    assert await queue_length(live) == 0
    ok = await live.submit(tiny_graph(), task_id="x" * 256)
    assert ok.status_code == 200 and ok.headers["X-Task-Id"] == "x" * 256


async def test_a_repeated_task_id_is_two_tasks(api: ApiFactory) -> None:
    live = await api()
    first, second = [await live.submit(tiny_graph(), task_id="same") for _ in range(2)]
    assert (first.text, second.text) == ("1", "2")
    assert first.headers["X-Eas-Queueservice-Request-Id"] != second.headers["X-Eas-Queueservice-Request-Id"]
    assert await queue_length(live) == 2


async def idempotent_submit(live, key: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        return await http.post("/api_prompt", params=params, content=json.dumps(tiny_graph()).encode(),
                               headers={"Authorization": TOKEN, "Idempotency-Key": key})


async def test_an_idempotency_key_makes_a_retry_answer_the_first_put(api: ApiFactory) -> None:
    queue_side = await api()
    remote_front = await api(queue_url=queue_side.url, sqlite_path=None)
    for n, live in enumerate((queue_side, remote_front)):
        first = await idempotent_submit(live, f"retry-{n}", task_id="t")
        again = await idempotent_submit(live, f"retry-{n}", task_id="t")
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.text == first.text
        assert again.headers["X-Eas-Queueservice-Request-Id"] == first.headers["X-Eas-Queueservice-Request-Id"]
        generated = [await idempotent_submit(live, f"no-task-id-{n}") for _ in range(2)]
        assert generated[0].text == generated[1].text
        assert generated[0].headers["X-Task-Id"] == generated[1].headers["X-Task-Id"]
        assert generated[0].headers["X-Task-Id"].startswith("task-")
    assert await queue_length(queue_side) == 4
    too_long = await idempotent_submit(queue_side, "k" * 257)
    assert too_long.status_code == 400
    assert await queue_length(queue_side) == 4


async def test_with_dedupe_task_id_a_repeated_task_id_answers_the_first_task(api: ApiFactory) -> None:
    queue_side = await api(dedupe_task_id=True)
    remote_front = await api(queue_url=queue_side.url, sqlite_path=None, dedupe_task_id=True)
    for live in (queue_side, remote_front):
        first, again = [await live.submit(tiny_graph(), task_id=f"same-{live.port}") for _ in range(2)]
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.text == first.text
        assert again.headers["X-Eas-Queueservice-Request-Id"] == first.headers["X-Eas-Queueservice-Request-Id"]
    assert await queue_length(queue_side) == 2
    keyed = await idempotent_submit(queue_side, "same-" + str(queue_side.port), task_id="other")
    assert keyed.text == "1"  # the header wins, and it names the same key as the first task_id


# -- input files sent with the task (issue 15, item 1) -----------------------------------------------------------


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def load_graph(name: str, prefix: str = "from_input") -> dict[str, Any]:
    """LoadImage(name) -> SaveImage."""
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def task_folders(data_dir: Path) -> list[Path]:
    root = data_dir / "input" / "api"
    return sorted(root.iterdir()) if root.is_dir() else []


async def post(live, **kwargs: Any) -> httpx.Response:
    params = kwargs.pop("params", {})
    headers = {"Authorization": TOKEN, **kwargs.pop("headers", {})}
    async with httpx.AsyncClient(base_url=live.url, trust_env=False) as http:
        return await http.post("/api_prompt", params=params, headers=headers, **kwargs)


async def saved_size(data_dir: Path, frame) -> tuple[int, int]:
    assert frame.tags["status"] == "success", frame.data
    [image] = json.loads(frame.data)[-1]["2"]["images"]
    with Image.open(data_dir / "output" / image.get("subfolder", "") / image["filename"]) as saved:
        return saved.size


async def test_inline_base64_input_runs_and_its_folder_goes_after_the_result(api: ApiFactory, instance_url: Any,
                                                                             data_dir: Path) -> None:
    live = await api(data_dir=data_dir, instance_urls=(await instance_url(),), max_payload_bytes=1 << 20)
    body = {"prompt": load_graph("face.png"),
            "inputs": [{"name": "face.png", "data": base64.b64encode(png(5, 7)).decode()}]}
    resp = await post(live, json=body, params={"task_id": "inline"})
    assert resp.status_code == 200, resp.text
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
    assert frame.tags["task_id"] == "inline"
    assert await saved_size(data_dir, frame) == (5, 7)
    await until(lambda: task_folders(data_dir) == [], what="the task's input folder removed")


async def test_multipart_file_and_url_input_fetched_by_the_worker(api: ApiFactory, instance_url: Any,
                                                                  data_dir: Path, aiohttp_server: Any) -> None:
    served = png(3, 4, (10, 200, 10))
    files = web.Application()
    files.router.add_get("/img/mask.png", lambda request: web.Response(body=served, content_type="image/png"))
    files.router.add_get("/moved", lambda request: web.HTTPFound("/img/mask.png"))
    server = await aiohttp_server(files)
    origin = f"http://127.0.0.1:{server.port}"
    live = await api(data_dir=data_dir, instance_urls=(await instance_url(),), max_payload_bytes=1 << 20,
                     input_url_allow=(origin + "/",))
    graph = load_graph("face.png", "multi")
    graph["3"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}}
    graph["4"] = {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fetched"}}
    prompt = {"prompt": graph, "inputs": [{"name": "mask.png", "url": origin + "/moved"}]}
    resp = await post(live, params={"task_id": "multi"},
                      files={"prompt": (None, json.dumps(prompt), "application/json"),
                             "image": ("face.png", png(6, 2), "image/png")})
    assert resp.status_code == 200, resp.text
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
    assert await saved_size(data_dir, frame) == (6, 2)
    [fetched] = json.loads(frame.data)[-1]["4"]["images"]
    with Image.open(data_dir / "output" / fetched["filename"]) as image:
        assert image.size == (3, 4)
    await until(lambda: task_folders(data_dir) == [], what="the task's input folder removed")


async def test_a_url_input_that_fails_is_an_error_result_not_a_crash(api: ApiFactory, instance_url: Any,
                                                                    data_dir: Path, aiohttp_server: Any) -> None:
    files = web.Application()
    files.router.add_get("/big.png", lambda request: web.Response(body=b"x" * 5000))
    files.router.add_get("/gone.png", lambda request: web.Response(status=404))
    # A redirect to an address outside the allowed prefix (here: the metadata address) is refused again.
    files.router.add_get("/escape", lambda request: web.HTTPFound("http://169.254.169.254/latest/meta-data"))
    server = await aiohttp_server(files)
    origin = f"http://127.0.0.1:{server.port}"
    live = await api(data_dir=data_dir, instance_urls=(await instance_url(),), input_url_allow=(origin + "/",),
                     input_limits=InputLimits(max_file_bytes=4096))
    for path in ("/big.png", "/gone.png", "/escape"):
        body = {"prompt": load_graph("in.png"), "inputs": [{"name": "in.png", "url": origin + path}]}
        assert (await post(live, json=body, params={"task_id": path})).status_code == 200
    async with live.sink() as sink:
        frames = {f.tags["task_id"]: f for f in await read_results(sink, 3)}
    for path, words in (("/big.png", "4096"), ("/gone.png", "404"), ("/escape", "169.254.169.254")):
        frame = frames[path]
        assert frame.tags["status"] == "error"
        [event] = json.loads(frame.data)
        assert event["data"]["exception_type"] == "input_fetch_failed"
        assert words in event["data"]["exception_message"], event
    await until(lambda: task_folders(data_dir) == [], what="the failed tasks' folders removed")
    # The worker lives on: a plain task still runs.
    assert (await live.submit(tiny_graph("after"), task_id="after")).status_code == 200
    async with live.sink() as sink:
        [frame] = await read_results(sink, 1)
    assert frame.tags["status"] == "success"


async def test_the_queued_item_points_the_graph_at_the_tasks_folder(api: ApiFactory, data_dir: Path) -> None:
    live = await api(data_dir=data_dir)
    image = png(2, 2)
    graph = load_graph("face.png")
    graph["3"] = {"class_type": "LoadImage", "inputs": {"image": "face.png [input]"}}
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    blob = bytes(range(256)) * 2
    mime = base64.encodebytes(blob).decode()  # MIME-style: line breaks every 76 characters
    resp = await post(live, json={"prompt": graph, "inputs": [{"name": "face.png", "data": data_url},
                                                               {"name": "mime.png", "data": mime}]})
    assert resp.status_code == 200, resp.text
    async with live.input() as queue:
        [frame] = await queue.get(0, 1, timeout_s=1.0)
    item = json.loads(frame.data)
    [folder] = task_folders(data_dir)
    relative = f"api/{folder.name}"
    assert item["comfyserve"] == {"inputs_dir": relative, "fetch": []}
    assert item["prompt"]["1"]["inputs"]["image"] == f"{relative}/face.png"
    assert item["prompt"]["3"]["inputs"]["image"] == f"{relative}/face.png [input]"
    assert (folder / "face.png").read_bytes() == image and (folder / "mime.png").read_bytes() == blob
    assert "\n" in mime
    # A task without inputs is queued exactly as before: the bare graph.
    await live.submit(tiny_graph(), task_id="plain")
    async with live.input() as queue:
        [_, plain] = await queue.get(0, 2, timeout_s=1.0)
    assert json.loads(plain.data) == tiny_graph()


async def test_input_folders_left_behind_go_after_the_retention(api: ApiFactory, data_dir: Path) -> None:
    live = await api(data_dir=data_dir, input_retention_s=0.2)
    body = {"prompt": load_graph("a.png"), "inputs": [{"name": "a.png", "data": base64.b64encode(png(1, 1)).decode()}]}
    assert (await post(live, json=body)).status_code == 200
    assert len(task_folders(data_dir)) == 1
    await until(lambda: task_folders(data_dir) == [], what="the retention sweep")


async def test_hostile_inputs_are_4xx_nothing_queued_nothing_written(api: ApiFactory, data_dir: Path,
                                                                      tmp_path: Path) -> None:
    live = await api(data_dir=data_dir, input_limits=InputLimits(max_file_bytes=1000, max_total_bytes=1500))
    before = files_under(tmp_path)
    ok = base64.b64encode(b"x" * 10).decode()
    graph = load_graph("a.png")
    cases: list[tuple[Any, int, str]] = [
        ([{"name": "a.png", "data": "not base64 !!"}], 400, "not valid base64"),
        ([{"name": "a.png", "data": "QUJDR"}], 400, "not valid base64"),
        ([{"name": "a.png", "data": "YQ==YQ=="}], 400, "not valid base64"),  # data after the padding
        ([{"name": "a.png", "data": "=YQ=="}], 400, "not valid base64"),
        ([{"name": "a.png", "data": "YWJjé==="}], 400, "not valid base64"),  # not ASCII
        ([{"name": "../a.png", "data": ok}], 400, "not a path"),
        ([{"name": "sub/a.png", "data": ok}], 400, "not a path"),
        ([{"name": "..\\a.png", "data": ok}], 400, "not a path"),
        ([{"name": "..", "data": ok}], 400, "must not start with '.'"),
        ([{"name": "", "data": ok}], 400, "non-empty"),
        ([{"name": "a\x00.png", "data": ok}], 400, "control"),
        ([{"name": "a.png", "url": "http://127.0.0.1:1/x.png"}], 400, "not a public address"),
        ([{"name": "a.png", "url": "http://169.254.169.254/latest"}], 400, "not a public address"),
        ([{"name": "a.png", "url": "http://localhost/x.png"}], 400, "local"),
        ([{"name": "a.png", "url": "file:///etc/passwd"}], 400, "http(s)"),
        ([{"name": "a.png", "url": "ftp://example.com/x.png"}], 400, "http(s)"),
        ([{"name": "a.png", "data": ok, "url": "https://example.com/x.png"}], 400, "exactly one"),
        ([{"name": "a.png", "data": ok}, {"name": "a.png", "data": ok}], 400, "twice"),
        ({"name": "a.png"}, 400, "must be a list"),
        ([{"name": "a.png", "data": base64.b64encode(b"x" * 1001).decode()}], 413, "--max-input-file"),
        ([{"name": f"{i}.png", "data": base64.b64encode(b"x" * 900).decode()} for i in range(2)], 413,
         "--max-input-total"),
    ]
    for inputs, status, words in cases:
        resp = await post(live, json={"prompt": graph, "inputs": inputs}, params={"task_id": "bad"})
        assert resp.status_code == status, (inputs, resp.text)
        assert words in resp.json()["error"]["message"], (inputs, resp.text)
    multipart_cases: list[tuple[dict[str, Any], int, str]] = [
        ({"prompt": (None, json.dumps(graph)), "f": ("../../a.png", b"x")}, 400, "not a path"),
        ({"prompt": (None, json.dumps(graph)), "f": ("a.png", b"x" * 1001)}, 413, "--max-input-file"),
        ({"prompt": (None, "{not json"), "f": ("a.png", b"x")}, 400, "not JSON"),
        ({"prompt": (None, json.dumps(graph)), "other": (None, "x")}, 400, "unexpected form field"),
        ({"f": ("a.png", b"x")}, 400, "empty"),
        ({"prompt": (None, json.dumps({"1": {"inputs": {}}})), "f": ("a.png", b"x")}, 400, "class_type"),
    ]
    for files, status, words in multipart_cases:
        resp = await post(live, files=files, params={"task_id": "bad"})
        assert resp.status_code == status, (files, resp.text)
        assert words in resp.json()["error"]["message"], (files, resp.text)
    # A graph too big after the files were written: the files go too.
    big = load_graph("a.png", "x" * 70_000)
    resp = await post(live, files={"prompt": (None, json.dumps(big)), "f": ("a.png", b"x")})
    assert resp.status_code == 413, resp.text
    assert await queue_length(live) == 0
    assert {p for p in files_under(tmp_path) - before if not p.name.startswith("queue-")} == set()
    assert task_folders(data_dir) == []


async def test_a_front_without_a_data_dir_refuses_input_files(api: ApiFactory) -> None:
    live = await api()
    resp = await post(live, json={"prompt": load_graph("a.png"),
                                  "inputs": [{"name": "a.png", "data": base64.b64encode(b"x").decode()}]})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "inputs_unavailable"
    assert await queue_length(live) == 0


async def test_an_idempotent_retry_with_inputs_keeps_one_folder(api: ApiFactory, data_dir: Path) -> None:
    live = await api(data_dir=data_dir)
    body = {"prompt": load_graph("a.png"), "inputs": [{"name": "a.png", "data": base64.b64encode(png(1, 1)).decode()}]}
    answers = [await post(live, json=body, headers={"Idempotency-Key": "once"}) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].headers["X-Eas-Queueservice-Request-Id"] == answers[1].headers["X-Eas-Queueservice-Request-Id"]
    assert await queue_length(live) == 1
    [folder] = task_folders(data_dir)
    async with live.input() as queue:
        [frame] = await queue.get(0, 1, timeout_s=1.0)
    assert json.loads(frame.data)["comfyserve"]["inputs_dir"] == f"api/{folder.name}"


def test_input_flags_and_their_environment_reach_the_settings(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from api_edition.command import settings_from_args
    from api_edition.worker_command import settings_from_args as worker_settings_from_args
    from standard.cli import build_parser
    from standard.errors import ConfigError

    monkeypatch.setenv("COMFYSERVE_INPUT_URL_ALLOW", "https://files.example.com/in/,http://10.0.0.5:8080/")
    args = build_parser().parse_args(["api", "--data-dir", str(tmp_path), "--max-input-file", "1000",
                                      "--max-input-total", "3000", "--input-retention", "60",
                                      "--max-inline-output", "5"])
    settings = settings_from_args(args)
    assert settings.input_limits == InputLimits(max_file_bytes=1000, max_total_bytes=3000)
    assert settings.input_url_allow == ("https://files.example.com/in/", "http://10.0.0.5:8080/")
    assert (settings.input_retention_s, settings.max_inline_output_bytes) == (60.0, 5)
    worker = worker_settings_from_args(build_parser().parse_args([
        "worker", "--queue-url", "http://q:9000", "--instance-url", "http://i:8000", "--data-dir", str(tmp_path),
        "--input-fetch-timeout", "5"]))
    assert worker.data_dir == tmp_path.resolve() and worker.input_fetch_timeout_s == 5.0
    assert worker.input_url_allow == ("https://files.example.com/in/", "http://10.0.0.5:8080/")
    for bad in (["--input-url-allow", "ftp://x/"], ["--max-input-file", "0"], ["--input-retention", "-1"]):
        monkeypatch.delenv("COMFYSERVE_INPUT_URL_ALLOW", raising=False)
        with pytest.raises(ConfigError):
            settings_from_args(build_parser().parse_args(["api", "--data-dir", str(tmp_path), *bad]))
