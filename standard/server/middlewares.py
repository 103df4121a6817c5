"""Middlewares of the instance app: JSON bodies for framework errors.

aiohttp answers a body over ``client_max_size`` with a plain-text 413; clients
of this API expect JSON, so such errors are re-shaped here. Who may call what
(token, cookie, Origin, Host) is ``standard.auth.AccessGuard``'s job.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import PathTooLong
from ..http_util import JSONError, json_error

log = logging.getLogger("comfyserve.server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """413 (and 405) from aiohttp itself get a JSON error body; a request path too long for the disk is a 400."""
    try:
        return await handler(request)
    except PathTooLong as exc:
        raise _path_too_long(str(exc)) from None
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        raise _path_too_long("a name in the request is longer than the file system allows") from None
    except JSONError:
        raise  # already ours
    except web.HTTPRequestEntityTooLarge as exc:
        raise json_error(413, "request_too_large", "Request body too large", exc.text or "") from None
    except web.HTTPMethodNotAllowed as exc:
        raise json_error(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}",
                         headers={"Allow": exc.headers.get("Allow", "")}) from None


def _path_too_long(details: str) -> JSONError:
    return json_error(400, "invalid_request", "file name or path too long", details)
