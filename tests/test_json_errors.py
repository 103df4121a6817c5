"""One JSON error helper: every role answers errors in ComfyUI's shape, built by ``json_error``."""

from __future__ import annotations

import json

from aiohttp import web

from standard.errors import ComfyServeError
from standard.http_util import JSONError, json_error
from support.api import ApiFactory

COMFYUI_ERROR_KEYS = {"type", "message", "details", "extra_info"}


def test_json_error_is_the_aiohttp_error_of_its_status_and_a_comfyserve_error() -> None:
    error = json_error(404, "not_found", "Job not found", "abc", extra={"node_errors": {}})
    assert isinstance(error, web.HTTPNotFound) and isinstance(error, ComfyServeError)
    assert error.status == 404 and error.content_type == "application/json"
    assert error.text == json.dumps({"error": {"type": "not_found", "message": "Job not found", "details": "abc",
                                               "extra_info": {}}, "node_errors": {}})
    unusual = json_error(421, "misdirected_request", "wrong host", headers={"Retry-After": "1"})
    assert isinstance(unusual, JSONError) and unusual.status == 421 and unusual.headers["Retry-After"] == "1"
    assert json_error(599, "odd", "no aiohttp class for this one").status == 599


async def test_the_access_guard_answers_in_comfyuis_error_shape(instance) -> None:
    client = await instance(token="s3cret-token-of-twenty-chars")
    missing = await client.get("/queue")
    assert missing.status == 401
    body = await missing.json()
    assert set(body["error"]) == COMFYUI_ERROR_KEYS and body["error"]["type"] == "unauthorized"
    wrong = await client.get("/queue", headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert wrong.status == 401 and set((await wrong.json())["error"]) == COMFYUI_ERROR_KEYS


async def test_the_api_front_answers_in_comfyuis_error_shape(api: ApiFactory) -> None:
    live = await api()
    refused = await live.submit(b"not json")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert set(error) == COMFYUI_ERROR_KEYS and error["type"] == "invalid_json"
    unauthorized = await live.submit({"1": {}}, token="wrong")
    assert unauthorized.status_code == 401
    assert set(unauthorized.json()["error"]) == COMFYUI_ERROR_KEYS
