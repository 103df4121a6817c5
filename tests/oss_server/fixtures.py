"""pytest fixtures for the OSS tests: a running test server, a bucket, storage settings for it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from .runner import RunningOssServer, start_in_thread
from .server import OssTestServer

KEY_ID = "test-key-id"
SECRET = "test-key-secret"
BUCKET = "comfy-bucket"


@pytest.fixture
def oss() -> Iterator[RunningOssServer]:
    """A fresh OSS test server on a loopback port with one empty bucket."""
    running = start_in_thread(OssTestServer({KEY_ID: SECRET}))
    running.server.create_bucket(BUCKET)
    yield running
    running.stop()


def storage_settings(running: RunningOssServer, tmp: Path, *, prefix: str = "data", mounted: bool = False,
                     **overrides: object):
    """StorageSettings for ``oss://BUCKET/prefix`` on ``running`` (small parts so tests split files)."""
    from standard.storage import OssLocation, StorageSettings

    location = OssLocation.parse(f"oss://{BUCKET}/{prefix}")
    settings = StorageSettings(
        location=None if mounted else location,
        mounted_location=location if mounted else None,
        endpoint=running.endpoint, access_key_id=KEY_ID, access_key_secret=SECRET,
        cache_dir=tmp / "cache", part_size_bytes=256 * 1024, download_workers=4,
    )
    return replace(settings, **overrides) if overrides else settings


def random_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic incompressible bytes."""
    import random

    return random.Random(seed).randbytes(size)


__all__ = ["BUCKET", "KEY_ID", "SECRET", "oss", "random_bytes", "storage_settings"]
