"""A small OSS-compatible server for tests: enough of the protocol for the real ``oss2`` SDK.

Path-style addressing (``http://127.0.0.1:PORT/BUCKET/KEY``, which oss2 uses
for an IP endpoint), v1 signatures (header ``Authorization: OSS id:sig`` and
signed URLs ``?OSSAccessKeyId&Expires&Signature``), ListObjects with
prefix/marker/max-keys/delimiter paging, ranged GET, PutObject, multipart
upload, HEAD with ``x-oss-hash-crc64ecma`` and ``ETag``, DELETE, and errors as
the XML oss2 parses. Objects live in memory.

Signatures: ``signing``. Faults for tests (``faults.Faults``): answer 500 to the next N matching
requests, drop the connection after sending part of a GET body, slow bodies.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import crcmod
from aiohttp import web

from .faults import Faults
from .signing import check_signature

_crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
SEND_CHUNK = 1024 * 1024


def crc64(data: bytes) -> int:
    """CRC-64/XZ (ECMA-182), the checksum OSS reports as ``x-oss-hash-crc64ecma``."""
    return _crc64(data)


@dataclass
class StoredObject:
    data: bytes
    etag: str
    content_type: str
    last_modified: float = field(default_factory=time.time)
    path: Path | None = None  # a copy on disk, served with sendfile (see OssTestServer.store_dir)

    @property
    def crc(self) -> int:
        cached = getattr(self, "_crc", None)
        if cached is None:
            cached = crc64(self.data)
            self._crc = cached
        return cached


class OssError(Exception):
    """An error answered as OSS's ``<Error>`` XML."""

    def __init__(self, status: int, code: str, message: str, request_id: str) -> None:
        super().__init__(code)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
            f"  <Code>{code}</Code>\n  <Message>{escape(message)}</Message>\n"
            f"  <RequestId>{request_id}</RequestId>\n  <HostId>127.0.0.1</HostId>\n</Error>\n"
        )
        self.response = web.Response(status=status, text=body, content_type="application/xml",
                                     headers={"x-oss-request-id": request_id})


class OssTestServer:
    """In-memory buckets + credentials + faults; ``app()`` builds the aiohttp app."""

    def __init__(self, credentials: dict[str, str] | None = None, *, sts_tokens: dict[str, str] | None = None,
                 store_dir: Path | None = None) -> None:
        # With a store_dir, objects are also written there and GETs use sendfile, so a benchmark
        # measures the client rather than this server's copying.
        self.store_dir = store_dir
        self.credentials = dict(credentials or {"test-key-id": "test-key-secret"})
        self.sts_tokens = dict(sts_tokens or {})  # key id -> required security token
        self.buckets: dict[str, dict[str, StoredObject]] = {}
        self.uploads: dict[str, tuple[str, str, dict[int, bytes]]] = {}
        self.faults = Faults()
        self.requests: list[tuple[str, str, str]] = []  # (method, bucket, key) log for tests

    # -- direct access for test set-up ----------------------------------------

    def create_bucket(self, name: str) -> None:
        self.buckets.setdefault(name, {})

    def put(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.create_bucket(bucket)
        self._store(bucket, key, StoredObject(data, _md5_etag(data), content_type))

    def _store(self, bucket: str, key: str, obj: StoredObject) -> None:
        if self.store_dir is not None:
            obj.path = self.store_dir / uuid.uuid4().hex
            obj.path.write_bytes(obj.data)
        old = self.buckets[bucket].get(key)
        self.buckets[bucket][key] = obj
        if old is not None and old.path is not None:
            old.path.unlink(missing_ok=True)

    def get(self, bucket: str, key: str) -> bytes | None:
        obj = self.buckets.get(bucket, {}).get(key)
        return None if obj is None else obj.data

    # -- app ------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2 * 1024**3)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except OssError as exc:
            return exc.response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        request_id = uuid.uuid4().hex[:24].upper()
        bucket, key = _split_path(request.raw_path.split("?", 1)[0])
        self.requests.append((request.method, bucket, key))
        fault = self.faults.take(request.method, key, "status")
        if fault is not None:
            raise OssError(fault.status, "InternalError", "injected fault", request_id)
        check_signature(request, bucket, key, self.credentials, self.sts_tokens,
                        lambda status, code, message: OssError(status, code, message, request_id))
        if not bucket:
            raise OssError(400, "InvalidArgument", "service-level requests are not supported", request_id)
        if bucket not in self.buckets:
            raise OssError(404, "NoSuchBucket", "The specified bucket does not exist.", request_id)
        query = request.query
        headers = {"x-oss-request-id": request_id}
        if not key:
            if request.method == "GET":
                return self._list(bucket, query, headers)
            raise OssError(405, "MethodNotAllowed", "unsupported bucket operation", request_id)
        if request.method == "POST" and "uploads" in query:
            upload_id = uuid.uuid4().hex
            self.uploads[upload_id] = (bucket, key, {})
            return _xml(f"<InitiateMultipartUploadResult><Bucket>{bucket}</Bucket><Key>{escape(key)}</Key>"
                        f"<UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>", headers)
        if request.method == "PUT" and "uploadId" in query:
            return await self._upload_part(request, bucket, key, headers, request_id)
        if request.method == "POST" and "uploadId" in query:
            return await self._complete(request, bucket, key, headers, request_id)
        if request.method == "DELETE" and "uploadId" in query:
            self.uploads.pop(query["uploadId"], None)
            return web.Response(status=204, headers=headers)
        if request.method == "PUT":
            data = await request.read()
            _check_md5(request, data, request_id)
            obj = StoredObject(data, _md5_etag(data), request.headers.get("Content-Type", "application/octet-stream"))
            self._store(bucket, key, obj)
            headers.update({"ETag": f'"{obj.etag}"', "x-oss-hash-crc64ecma": str(obj.crc)})
            return web.Response(status=200, headers=headers)
        if request.method == "DELETE":  # DeleteObject: 204 whether or not the key existed
            gone = self.buckets[bucket].pop(key, None)
            if gone is not None and gone.path is not None:
                gone.path.unlink(missing_ok=True)
            return web.Response(status=204, headers=headers)
        obj = self.buckets[bucket].get(key)
        if obj is None:
            raise OssError(404, "NoSuchKey", "The specified key does not exist.", request_id)
        if request.method == "HEAD":
            headers.update(_object_headers(obj))
            headers["Content-Length"] = str(len(obj.data))
            return web.Response(status=200, headers=headers)
        if request.method == "GET":
            return await self._get(request, key, obj, headers)
        raise OssError(405, "MethodNotAllowed", f"{request.method} not supported", request_id)

    # -- operations -----------------------------------------------------------

    def _list(self, bucket: str, query: dict, headers: dict[str, str]) -> web.Response:
        prefix = query.get("prefix", "")
        marker = query.get("marker", "")
        delimiter = query.get("delimiter", "")
        max_keys = max(1, min(int(query.get("max-keys", "100") or 100), 1000))
        url_encoded = query.get("encoding-type") == "url"
        contents: list[StoredObject | None] = []
        names: list[str] = []
        seen_prefixes: set[str] = set()
        truncated = False
        for name in sorted(self.buckets[bucket]):
            if not name.startswith(prefix) or name <= marker:
                continue
            if delimiter:
                cut = name.find(delimiter, len(prefix))
                if cut >= 0:
                    common = name[: cut + len(delimiter)]
                    if common in seen_prefixes or common <= marker:
                        continue
                    if len(names) >= max_keys:
                        truncated = True
                        break
                    seen_prefixes.add(common)
                    names.append(common)
                    contents.append(None)
                    continue
            if len(names) >= max_keys:
                truncated = True
                break
            names.append(name)
            contents.append(self.buckets[bucket][name])

        def enc(text: str) -> str:
            return escape(_url_quote(text) if url_encoded else text)

        parts = [f"<ListBucketResult><Name>{bucket}</Name><Prefix>{enc(prefix)}</Prefix>"
                 f"<Marker>{enc(marker)}</Marker><MaxKeys>{max_keys}</MaxKeys><Delimiter>{enc(delimiter)}</Delimiter>"
                 f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if url_encoded:
            parts.append("<EncodingType>url</EncodingType>")
        if truncated and names:
            parts.append(f"<NextMarker>{enc(names[-1])}</NextMarker>")
        for name, obj in zip(names, contents):
            if obj is None:
                parts.append(f"<CommonPrefixes><Prefix>{enc(name)}</Prefix></CommonPrefixes>")
            else:
                parts.append(
                    f"<Contents><Key>{enc(name)}</Key><LastModified>{_iso8601(obj.last_modified)}</LastModified>"
                    f'<ETag>"{obj.etag}"</ETag><Type>{"Multipart" if "-" in obj.etag else "Normal"}</Type>'
                    f"<Size>{len(obj.data)}</Size><StorageClass>Standard</StorageClass>"
                    "<Owner><ID>0</ID><DisplayName>test</DisplayName></Owner></Contents>")
        parts.append("</ListBucketResult>")
        return _xml("".join(parts), headers)

    async def _get(self, request: web.Request, key: str, obj: StoredObject,
                   headers: dict[str, str]) -> web.StreamResponse:
        size = len(obj.data)
        start, end, status = 0, size - 1, 200
        range_header = request.headers.get("Range", "")
        if range_header.startswith("bytes="):
            parsed = _parse_range(range_header[6:], size)
            if parsed is not None:  # OSS ignores an invalid range and sends everything
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers.update(_object_headers(obj))
        if status == 206:
            headers.pop("x-oss-hash-crc64ecma")  # OSS sends the whole object's CRC only for a full GET
        headers["Accept-Ranges"] = "bytes"
        body = memoryview(obj.data)[start : end + 1]
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        drop = self.faults.take("GET", key, "drop")
        slow = self.faults.take("GET", key, "slow")
        if drop is None and slow is None and obj.path is not None and request.transport is not None:
            with obj.path.open("rb") as handle:
                await asyncio.get_running_loop().sendfile(request.transport, handle, start, len(body))
            await response.write_eof()
            return response
        limit = len(body) if drop is None else min(drop.after_bytes, len(body))
        sent = 0
        while sent < limit:
            chunk = body[sent : min(sent + SEND_CHUNK, limit)]
            await response.write(chunk)
            sent += len(chunk)
            if slow is not None:
                await asyncio.sleep(slow.delay_s)
        if drop is not None:
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def _upload_part(self, request: web.Request, bucket: str, key: str, headers: dict[str, str],
                           request_id: str) -> web.Response:
        upload = self.uploads.get(request.query["uploadId"])
        if upload is None or upload[:2] != (bucket, key):
            raise OssError(404, "NoSuchUpload", "The specified upload does not exist.", request_id)
        try:
            number = int(request.query.get("partNumber", ""))
        except ValueError:
            raise OssError(400, "InvalidArgument", "partNumber must be an integer", request_id) from None
        data = await request.read()
        _check_md5(request, data, request_id)
        upload[2][number] = data
        headers.update({"ETag": f'"{_md5_etag(data)}"', "x-oss-hash-crc64ecma": str(crc64(data))})
        return web.Response(status=200, headers=headers)

    async def _complete(self, request: web.Request, bucket: str, key: str, headers: dict[str, str],
                        request_id: str) -> web.Response:
        upload_id = request.query["uploadId"]
        upload = self.uploads.get(upload_id)
        if upload is None or upload[:2] != (bucket, key):
            raise OssError(404, "NoSuchUpload", "The specified upload does not exist.", request_id)
        root = ElementTree.fromstring(await request.read())
        numbers: list[int] = []
        for part in root.findall("Part"):
            number = int(part.findtext("PartNumber", "0"))
            etag = (part.findtext("ETag") or "").strip('"')
            data = upload[2].get(number)
            if data is None or _md5_etag(data) != etag:
                raise OssError(400, "InvalidPart", f"part {number} was not uploaded or its ETag differs", request_id)
            numbers.append(number)
        if numbers != sorted(numbers):
            raise OssError(400, "InvalidPartOrder", "parts must be in ascending order", request_id)
        data = b"".join(upload[2][n] for n in numbers)
        digest = hashlib.md5(b"".join(hashlib.md5(upload[2][n]).digest() for n in numbers)).hexdigest().upper()
        obj = StoredObject(data, f"{digest}-{len(numbers)}", "application/octet-stream")
        self._store(bucket, key, obj)
        del self.uploads[upload_id]
        headers["x-oss-hash-crc64ecma"] = str(obj.crc)
        return _xml(f"<CompleteMultipartUploadResult><Bucket>{bucket}</Bucket><Key>{escape(key)}</Key>"
                    f'<ETag>"{obj.etag}"</ETag></CompleteMultipartUploadResult>', headers)


def _split_path(raw_path: str) -> tuple[str, str]:
    bucket, _, key = raw_path.lstrip("/").partition("/")
    return unquote(bucket), unquote(key)


def _parse_range(spec: str, size: int) -> tuple[int, int] | None:
    first, _, last = spec.partition("-")
    try:
        if first == "":
            length = int(last)
            return (max(size - length, 0), size - 1) if length > 0 and size else None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        return None
    return start, min(end, size - 1)


def _object_headers(obj: StoredObject) -> dict[str, str]:
    return {
        "ETag": f'"{obj.etag}"',
        "Content-Type": obj.content_type,
        "Last-Modified": formatdate(obj.last_modified, usegmt=True),
        "x-oss-hash-crc64ecma": str(obj.crc),
        "x-oss-object-type": "Multipart" if "-" in obj.etag else "Normal",
        "x-oss-storage-class": "Standard",
    }


def _check_md5(request: web.Request, data: bytes, request_id: str) -> None:
    sent = request.headers.get("Content-MD5")
    if sent and base64.b64encode(hashlib.md5(data).digest()).decode() != sent:
        raise OssError(400, "InvalidDigest", "The Content-MD5 you specified is not valid.", request_id)


def _md5_etag(data: bytes) -> str:
    return hashlib.md5(data).hexdigest().upper()


def _iso8601(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _url_quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="/")


def _xml(body: str, headers: dict[str, str]) -> web.Response:
    return web.Response(text='<?xml version="1.0" encoding="UTF-8"?>\n' + body,
                        content_type="application/xml", headers=headers)
