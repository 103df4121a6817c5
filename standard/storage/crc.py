"""CRC-64/XZ (what OSS reports as ``x-oss-hash-crc64ecma``), fast when ``fastcrc`` is installed.

oss2's own CRC (crcmod) runs at ~150 MB/s and would cap a download at that;
fastcrc does several GB/s. Both give the same value; combining part CRCs uses
oss2's implementation (a few calls per file).
"""

from __future__ import annotations

import os
from types import ModuleType

import crcmod
import oss2.utils

_fast: ModuleType | None
try:
    from fastcrc import crc64 as _fast
except ImportError:  # pragma: no cover - fastcrc is a dependency; keep working without it
    _fast = None


def crc64_update(crc: int, data: bytes | memoryview) -> int:
    """The CRC64 of everything so far followed by ``data`` (start with 0)."""
    if _fast is not None:
        return _fast.xz(data, crc) if crc else _fast.xz(data)
    return _slow(data, crc)


def file_crc64(path: str | os.PathLike[str], *, chunk_bytes: int = 8 * 1024 * 1024) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            crc = crc64_update(crc, chunk)
    return crc


def crc64_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC64 of A+B from crc(A), crc(B) and len(B)."""
    return _COMBINER.combine(crc1, crc2, len2)


_COMBINER = oss2.utils.Crc64(0)
# crcmod's function continues from a finished CRC value (its init is in the xor-ed domain).
_slow = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
