"""The hand-built ``DataFrameProto`` encoding (``encode_body``/``encode_frame``) is what protobuf itself makes,
for lengths on both sides of the one-byte varint (127/128) and beyond."""

from __future__ import annotations

import pytest

from queue_service.protocol import DataFrameProto, decode_frame, encode_body, encode_frame

SIZES = [0, 1, 127, 128, 300, 16_383, 16_384, 70_000]


@pytest.mark.parametrize("size", SIZES)
def test_frames_are_protobufs_bytes(size: int) -> None:
    tags = {"requestId": "r" * max(1, size % 200), "k" * (size % 130 + 1): "v" * size}
    data, message = b"\x00\xff" * (size // 2), "m\u00e9" * (size % 150)
    for index in (0, 1, 127, 128, 2**40, 2**63 - 1):
        ours = encode_frame(index, encode_body(tags, data, message))
        assert decode_frame(ours) == (index, tags, data, message)
        single = DataFrameProto(index=index, data=data, message=message)
        single.tags["requestId"] = tags["requestId"]
        assert encode_frame(index, encode_body({"requestId": tags["requestId"]}, data, message)) \
            == single.SerializeToString(deterministic=True)
