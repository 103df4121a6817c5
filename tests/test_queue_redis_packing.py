"""The Redis store packs commands itself (``_LeanPacking``): the bytes must be redis-py's, for every kind of
argument the store and redis-py's own commands send."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from queue_service.redis_store import _LeanPacking


class LeanConnection(_LeanPacking, Connection):
    pass


COMMANDS = [
    ("EVALSHA", "a" * 40, 0, "cqs:{q}:", "cqs:changes", "q", 2, "0", "a3c1e5b2-1111-4222-8333-123456789abc",
     b"\x12\x00" + b"x" * 300, 0, "1", "r\u00e9", b"", 10, 9, "g/c", "s", 64, 0, "0", 1_764_000_000_000, 30000),
    ("SCRIPT LOAD", "return 1"),  # a two-word command: sent as two arguments
    (b"CONFIG GET", b"maxmemory"),
    ("SET", "k", memoryview(b"view")),
    ("SET", "k", 1.5),
    ("INCRBY", "k", -7),
    ("SET", "big", b"y" * 100_000),  # beyond redis-py's buffer cutoff, where it splits into chunks
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: str(command[0]))
def test_commands_pack_to_the_bytes_redis_py_sends(command: tuple[object, ...]) -> None:
    ours = b"".join(bytes(part) for part in LeanConnection().pack_command(*command))
    theirs = b"".join(bytes(part) for part in Connection().pack_command(*command))
    assert ours == theirs


def test_arguments_redis_py_refuses_are_refused_alike() -> None:
    for bad in (True, None):
        with pytest.raises(DataError):
            LeanConnection().pack_command("SET", "k", bad)
