"""The one header policy for serving user files (``/view`` here, in the cluster, and relayed from ComfyUI).

A user's upload is served from the app's own origin, so a file a browser
would *render* — SVG, HTML, XML, PDF — runs its script with the user's
session: stored XSS. Only media types that cannot carry script are served
inline; everything else is a download (``application/octet-stream``,
``Content-Disposition: attachment``). Every file response also gets
``X-Content-Type-Options: nosniff`` (no guessing HTML from the bytes) and a
CSP that blocks scripts and sandboxes the document if one is opened anyway.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from urllib.parse import quote

# Extension -> type for what may be shown inline (a fixed table: mimetypes reads /etc/mime.types).
INLINE_TYPES_BY_SUFFIX = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
    ".gif": "image/gif", ".avif": "image/avif", ".bmp": "image/bmp",
    ".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
    ".mp3": "audio/mpeg", ".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg",
    ".opus": "audio/ogg", ".m4a": "audio/mp4", ".aac": "audio/aac",
}
INLINE_TYPES = frozenset(INLINE_TYPES_BY_SUFFIX.values()) | {"audio/x-wav", "audio/wave", "audio/x-flac",
                                                            "video/ogg", "audio/webm"}
DOWNLOAD_TYPE = "application/octet-stream"
# Media still display inside the sandbox; scripts, frames, forms, plugins and styles do not run.
FILE_CSP = "default-src 'none'; img-src 'self' data: blob:; media-src 'self' data: blob:; sandbox"


def _disposition(kind: str, filename: str) -> str:
    """``inline|attachment; filename="ascii"; filename*=UTF-8''...`` with nothing a header could break on."""
    name = os.path.basename(filename.replace("\\", "/"))
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in name) or "file"
    if ascii_name == name:
        return f'{kind}; filename="{name}"'
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


def file_headers(filename: str, content_type: str | None = None) -> dict[str, str]:
    """Content-Type, Content-Disposition, nosniff and CSP for serving ``filename``.

    ``content_type`` is what the bytes are known to be (a converted preview, a
    relayed upstream answer); without it the type follows the extension. Shown
    inline only when that type is in ``INLINE_TYPES``.
    """
    if content_type is None:
        content_type = INLINE_TYPES_BY_SUFFIX.get(os.path.splitext(filename)[1].lower(), DOWNLOAD_TYPE)
    content_type = content_type.split(";", 1)[0].strip().lower()
    inline = content_type in INLINE_TYPES
    return {
        "Content-Type": content_type if inline else DOWNLOAD_TYPE,
        "Content-Disposition": _disposition("inline" if inline else "attachment", filename),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": FILE_CSP,
    }


def apply_file_headers(headers: MutableMapping[str, str], filename: str) -> None:
    """Rewrite relayed response ``headers`` in place to the policy (the upstream's type is only a hint)."""
    policy = file_headers(filename, headers.get("Content-Type") or DOWNLOAD_TYPE)
    for name, value in policy.items():
        if name in headers:
            del headers[name]  # every copy, in a multidict too
        headers[name] = value
