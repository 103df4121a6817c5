"""OSS v1 signatures as the test server checks them: ``Authorization: OSS id:sig`` headers and
signed URLs (``OSSAccessKeyId``, ``Expires``, ``Signature``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from aiohttp import web

# Query parameters that are part of the v1 canonical resource (a subset of oss2's list).
SUBRESOURCES = frozenset({
    "acl", "uploadId", "uploads", "partNumber", "delete", "location", "objectMeta", "security-token",
    "response-content-type", "response-content-language", "response-cache-control",
    "response-content-encoding", "response-expires", "response-content-disposition",
    "x-oss-process", "tagging", "versionId", "versioning", "stat", "bucketInfo", "append", "position",
    "symlink", "restore", "continuation-token", "x-oss-traffic-limit", "x-oss-request-payer", "sequential",
})


def check_signature(request: web.Request, bucket: str, key: str, credentials: dict[str, str],
                    sts_tokens: dict[str, str], fail: Callable[[int, str, str], Exception]) -> None:
    """Raise ``fail(status, code, message)`` unless the request carries a valid v1 signature."""
    query = request.query
    header = request.headers.get("Authorization", "")
    if header.startswith("OSS "):
        key_id, _, signature = header[4:].partition(":")
        date = request.headers.get("x-oss-date") or request.headers.get("Date", "")
        try:
            skew_s = abs(time.time() - parsedate_to_datetime(date).timestamp())
        except (TypeError, ValueError):
            raise fail(403, "AccessDenied", "missing or invalid Date header") from None
        if skew_s > 900:
            raise fail(403, "RequestTimeTooSkewed", "the request time is too skewed")
        token = request.headers.get("x-oss-security-token")
    elif "Signature" in query:
        key_id, signature, date = query.get("OSSAccessKeyId", ""), query["Signature"], query.get("Expires", "")
        if not date.isdigit() or int(date) < time.time():
            raise fail(403, "AccessDenied", "Request has expired.")
        token = query.get("security-token")
    else:
        raise fail(403, "AccessDenied", "You have no right to access this object.")
    secret = credentials.get(key_id)
    if secret is None:
        raise fail(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist.")
    if key_id in sts_tokens and token != sts_tokens[key_id]:
        raise fail(403, "InvalidSecurityToken", "The security token you provided is invalid.")
    string_to_sign = _string_to_sign(request, bucket, key, date)
    expected = base64.b64encode(hmac.new(secret.encode(), string_to_sign, hashlib.sha1).digest()).decode()
    if not hmac.compare_digest(expected, signature):
        raise fail(403, "SignatureDoesNotMatch",
                   "The request signature we calculated does not match the signature you provided.")


def _string_to_sign(request: web.Request, bucket: str, key: str, date: str) -> bytes:
    headers = request.headers
    oss_headers = sorted((k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-oss-"))
    canon_headers = "".join(f"{k}:{v}\n" for k, v in oss_headers)
    sub = sorted((k, v) for k, v in request.query.items() if k in SUBRESOURCES)
    resource = f"/{bucket}/{key}" if bucket else "/"
    if sub:
        resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in sub)
    lines = [request.method, headers.get("Content-MD5", ""), headers.get("Content-Type", ""), date,
             canon_headers + resource]
    return "\n".join(lines).encode()
