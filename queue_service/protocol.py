"""The queue service's wire messages (protobuf package ``streaming``).

The platform's SDK ships generated classes for ``queueservice.proto``; we
build the same two messages at import time from a ``FileDescriptorProto``
so no ``protoc`` step is needed and any protobuf version works. The hot path
(one frame per delivered item) does not go through these classes at all:
``encode_frame`` prepends the index field to a pre-encoded body, which is
valid protobuf because a message's fields may come in any order.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="comfyserve/queueservice.proto", package="streaming",
                                              syntax="proto3")
    frame = file.message_type.add(name="DataFrameProto")
    frame.field.add(name="index", number=1, type=_F.TYPE_UINT64, label=_F.LABEL_OPTIONAL)
    frame.field.add(name="tags", number=2, type=_F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
                    type_name=".streaming.DataFrameProto.TagsEntry")
    frame.field.add(name="data", number=3, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    frame.field.add(name="message", number=4, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    entry = frame.nested_type.add(name="TagsEntry")
    entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    entry.options.map_entry = True
    frames = file.message_type.add(name="DataFrameListProto")
    frames.field.add(name="index", number=1, type=_F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
                     type_name=".streaming.DataFrameProto")
    return file


def _message_classes() -> tuple[type, type]:
    # A private pool: the SDK (or anyone) may register "streaming.*" in the default pool.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_build_file())
    frame = pool.FindMessageTypeByName("streaming.DataFrameProto")
    frames = pool.FindMessageTypeByName("streaming.DataFrameListProto")
    return message_factory.GetMessageClass(frame), message_factory.GetMessageClass(frames)


DataFrameProto, DataFrameListProto = _message_classes()


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]  # the varints below 128, built once (the usual lengths)


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(tag: int, payload: bytes) -> bytes:
    return _ONE_BYTE[tag] + _varint(len(payload)) + payload


def encode_body(tags: dict[str, str], data: bytes, message: str = "") -> bytes:
    """A ``DataFrameProto`` without its index (fields 2-4), stored once per item."""
    parts = []
    for key, value in tags.items():
        raw_key, raw_value = key.encode(), value.encode()
        entry = b"\x0a" + _varint(len(raw_key)) + raw_key + b"\x12" + _varint(len(raw_value)) + raw_value
        parts.append(b"\x12" + _varint(len(entry)) + entry)
    if data:
        parts.append(b"\x1a" + _varint(len(data)) + data)
    if message:
        parts.append(_len_field(0x22, message.encode()))
    return b"".join(parts)


def encode_frame(index: int, body: bytes) -> bytes:
    """A full ``DataFrameProto``: the index field followed by a stored body."""
    return b"\x08" + _varint(index) + body if index else body


def encode_frame_list(frames: list[bytes]) -> bytes:
    """A ``DataFrameListProto`` from encoded ``DataFrameProto`` messages."""
    return b"".join(_len_field(0x0A, frame) for frame in frames)


def decode_frame(raw: bytes) -> tuple[int, dict[str, str], bytes, str]:
    """(index, tags, data, message) of an encoded ``DataFrameProto``."""
    msg = DataFrameProto()
    msg.ParseFromString(raw)
    return msg.index, dict(msg.tags), msg.data, msg.message


def decode_frame_list(raw: bytes) -> list[tuple[int, dict[str, str], bytes, str]]:
    msg = DataFrameListProto()
    msg.ParseFromString(raw)
    return [(f.index, dict(f.tags), f.data, f.message) for f in msg.index]
