"""The requestIds the queue service makes up for puts without one: random UUID4s, never repeated,
also across a fork (the service's ids come from a pool of the OS's randomness)."""

from __future__ import annotations

import os
import uuid

from queue_service.ids import uuid4_str


def test_ids_are_random_uuid4_strings() -> None:
    ids = [uuid4_str() for _ in range(2000)]  # several pool refills
    assert len(set(ids)) == len(ids)
    for made in ids[:600]:
        parsed = uuid.UUID(made)
        assert str(parsed) == made and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    uuid4_str()  # the pool holds ids the child would hand out too, were it copied
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send one id and leave at once
        os.write(write, uuid4_str().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != uuid4_str()
