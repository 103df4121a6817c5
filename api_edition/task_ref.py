"""The task a status, cancel or events request names: ``?task_id=`` / ``?requestId=``, checked first.

The front accepts only task ids and requestIds that can travel in a header (1-256 printable
characters: ``queue_service.params.header_safe``), so no task can have any other: such a value is
a 400 saying why, before the store is asked (not a 404 that reads like "not there yet").
"""

from __future__ import annotations

from aiohttp import web

from queue_service import params
from queue_service.params import BadParam
from queue_service.store import REQUEST_ID_TAG
from standard.http_util import json_error

from .settings import TASK_ID_TAG


def check_task_refs(request: web.Request) -> None:
    """Raise 400 when a ``task_id`` or ``requestId`` of the query could not name any task."""
    for name in (TASK_ID_TAG, REQUEST_ID_TAG):
        for value in request.query.getall(name, []):
            try:
                params.header_safe(name, value)
            except BadParam as exc:
                raise json_error(400, "bad_request", str(exc)) from None
