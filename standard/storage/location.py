"""``oss://BUCKET/PREFIX`` locations: a bucket plus a key prefix that plays the data dir's root."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeGuard

from .errors import StorageConfigError

SCHEME = "oss://"
# OSS bucket names: 3-63 chars, lowercase letters, digits and hyphens, no hyphen at the ends.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


def is_oss_url(value: str | None) -> TypeGuard[str]:
    return value is not None and value.startswith(SCHEME)


@dataclass(frozen=True)
class OssLocation:
    """A bucket and a prefix; the prefix is '' or ends with '/'."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> OssLocation:
        """Parse ``oss://bucket/some/prefix``; refuses anything that could escape the prefix."""
        if not is_oss_url(url):
            raise StorageConfigError(f"not an oss:// URL: {url!r}")
        rest = url[len(SCHEME):]
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise StorageConfigError(
                f"invalid bucket name {bucket!r} in {url!r}: 3-63 lowercase letters, digits or '-'")
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts) or "\\" in prefix:
            raise StorageConfigError(f"invalid prefix in {url!r}: no '.', '..' or backslashes")
        return cls(bucket, "".join(p + "/" for p in parts))

    def key(self, *parts: str) -> str:
        """The object key of a data-dir relative path (parts are '/'-joined, never absolute)."""
        rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        return self.prefix + rel

    def relative(self, key: str) -> str:
        """The data-dir relative path of an object key under this prefix."""
        if not key.startswith(self.prefix):
            raise ValueError(f"{key!r} is not under {self.prefix!r}")
        return key[len(self.prefix):]

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"
