"""The storage package against the OSS test server through the real oss2 SDK: sync, listing,
lazy model fetch into the bounded cache, resume, integrity, faults, uploads, signed URLs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import oss2
import pytest
import requests
from oss_server.fixtures import BUCKET, KEY_ID, SECRET, random_bytes, storage_settings

from standard.storage import (
    CacheFullError,
    IntegrityError,
    OssLocation,
    StorageAuthError,
    StorageConfigError,
    TransientStorageError,
)
from standard.storage.client import OssClient
from standard.storage.download import part_paths
from standard.storage.storage import ObjectStorage

MB = 1024 * 1024


def make_storage(oss, tmp_path: Path, **overrides) -> ObjectStorage:
    settings = storage_settings(oss, tmp_path, **overrides)
    return ObjectStorage(settings, settings.local_root)


def range_gets(oss, key: str) -> int:
    return sum(1 for method, _bucket, k in oss.server.requests if method == "GET" and k == key)


# -- locations ---------------------------------------------------------------------------------

def test_oss_urls_parse_to_bucket_and_prefix() -> None:
    assert OssLocation.parse("oss://my-bucket/a/b") == OssLocation("my-bucket", "a/b/")
    assert OssLocation.parse("oss://my-bucket") == OssLocation("my-bucket", "")
    assert OssLocation.parse("oss://my-bucket/a//b/").key("models", "x.pt") == "a/b/models/x.pt"
    for bad in ("oss://", "oss://A_B/x", "s3://bucket/x", "oss://bucket/../x", "oss://ab/x"):
        with pytest.raises(StorageConfigError):
            OssLocation.parse(bad)


# -- listing and sync --------------------------------------------------------------------------

def test_listing_follows_pages(oss, tmp_path: Path) -> None:
    for i in range(7):
        oss.server.put(BUCKET, f"data/models/loras/l{i}.safetensors", b"x" * i)
    oss.server.put(BUCKET, "data/models/loras/", b"")  # a folder placeholder is no model
    oss.server.put(BUCKET, "other/models/loras/z.pt", b"z")
    storage = make_storage(oss, tmp_path)
    listed = storage.client.list("data/models/", page_size=3)
    assert [i.key for i in listed] == [f"data/models/loras/l{i}.safetensors" for i in range(7)]
    assert [i.size for i in listed] == list(range(7))
    pages = [q for q in oss.server.requests if q[0] == "GET" and q[2] == ""]
    assert len(pages) == 3


def test_custom_nodes_sync_down_adds_updates_and_removes(oss, tmp_path: Path, monkeypatch) -> None:
    from standard.storage import sync

    monkeypatch.setattr(sync, "LARGE_FILE_BYTES", 100_000)  # so the large-file path runs on a small file
    weights = random_bytes(300_000, 14)
    oss.server.put(BUCKET, "data/custom_nodes/pkg/weights.bin", weights)
    oss.server.put(BUCKET, "data/custom_nodes/one.py", b"NODE_CLASS_MAPPINGS = {}\n")
    oss.server.put(BUCKET, "data/custom_nodes/pkg/__init__.py", b"X = 1\n")
    storage = make_storage(oss, tmp_path)
    storage.prepare()
    nodes = storage.local_root / "custom_nodes"
    assert (nodes / "one.py").read_bytes() == b"NODE_CLASS_MAPPINGS = {}\n"
    assert (nodes / "pkg" / "__init__.py").read_bytes() == b"X = 1\n"
    assert (nodes / "pkg" / "weights.bin").read_bytes() == weights
    (nodes / "mine.py").write_text("# local, not from the bucket\n")

    before = range_gets(oss, "data/custom_nodes/one.py")
    oss.server.put(BUCKET, "data/custom_nodes/pkg/__init__.py", b"X = 2\n")
    del oss.server.buckets[BUCKET]["data/custom_nodes/one.py"]
    storage.prepare()
    assert (nodes / "pkg" / "__init__.py").read_bytes() == b"X = 2\n"
    assert not (nodes / "one.py").exists()
    assert (nodes / "mine.py").exists()  # never touch what a sync did not write
    assert range_gets(oss, "data/custom_nodes/one.py") == before


# -- model fetch -------------------------------------------------------------------------------

def test_models_are_listed_at_once_and_fetched_on_first_use(oss, tmp_path: Path) -> None:
    blob = random_bytes(3 * MB + 123)
    oss.server.put(BUCKET, "data/models/checkpoints/sd/model.safetensors", blob)
    oss.server.put(BUCKET, "data/models/vae/v.pt", b"vae")
    storage = make_storage(oss, tmp_path)
    storage.prepare()
    assert storage.model_names("checkpoints") == ["sd/model.safetensors"]
    assert storage.model_names("vae") == ["v.pt"]
    assert range_gets(oss, "data/models/checkpoints/sd/model.safetensors") == 0  # listed, not fetched

    path = storage.model_path("checkpoints", "sd/model.safetensors")
    assert Path(path).read_bytes() == blob
    gets = range_gets(oss, "data/models/checkpoints/sd/model.safetensors")
    assert gets == 13  # 256 KiB ranges
    assert storage.model_path("checkpoints", "sd/model.safetensors") == path
    assert range_gets(oss, "data/models/checkpoints/sd/model.safetensors") == gets  # cached
    assert storage.model_path("checkpoints", "missing.pt") is None
    assert storage.model_path("checkpoints", "../../escape.pt") is None

    # A new process (same cache dir) finds the warm cache and downloads nothing.
    again = make_storage(oss, tmp_path)
    again.prepare()
    assert again.model_path("checkpoints", "sd/model.safetensors") == path
    assert range_gets(oss, "data/models/checkpoints/sd/model.safetensors") == gets


def test_concurrent_first_uses_share_one_download(oss, tmp_path: Path) -> None:
    oss.server.put(BUCKET, "data/models/loras/big.safetensors", random_bytes(2 * MB, 1))
    storage = make_storage(oss, tmp_path)
    storage.prepare()
    paths: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(storage.model_path("loras", "big.safetensors")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and len(paths) == 4
    assert storage.cache.downloads == 1


def test_a_changed_object_is_fetched_again(oss, tmp_path: Path) -> None:
    oss.server.put(BUCKET, "data/models/vae/v.pt", b"old")
    storage = make_storage(oss, tmp_path)
    storage.prepare()
    assert Path(storage.model_path("vae", "v.pt")).read_bytes() == b"old"
    oss.server.put(BUCKET, "data/models/vae/v.pt", b"new!")
    storage.prepare()  # /restart re-lists
    assert Path(storage.model_path("vae", "v.pt")).read_bytes() == b"new!"


# -- faults ------------------------------------------------------------------------------------

def test_connection_dropped_mid_download_is_resumed(oss, tmp_path: Path) -> None:
    blob = random_bytes(2 * MB, 2)
    oss.server.put(BUCKET, "data/models/checkpoints/m.safetensors", blob)
    oss.server.faults.drop("m.safetensors", after_bytes=100_000, times=3)
    storage = make_storage(oss, tmp_path)
    storage.prepare()
    assert Path(storage.model_path("checkpoints", "m.safetensors")).read_bytes() == blob
    assert [f[0] for f in oss.server.faults.fired] == ["drop"] * 3


def test_a_500_once_is_retried(oss, tmp_path: Path) -> None:
    blob = random_bytes(MB, 3)
    oss.server.put(BUCKET, "data/models/checkpoints/m.safetensors", blob)
    storage = make_storage(oss, tmp_path)
    oss.server.faults.fail("GET", "", times=1)  # the listing itself fails once
    storage.prepare()
    oss.server.faults.fail("GET", "m.safetensors", times=1)
    oss.server.faults.fail("HEAD", "m.safetensors", times=1)
    assert Path(storage.model_path("checkpoints", "m.safetensors")).read_bytes() == blob
    assert len(oss.server.faults.fired) == 3


def test_failed_download_leaves_no_model_and_resumes_later(oss, tmp_path: Path) -> None:
    blob = random_bytes(2 * MB, 4)
    key = "data/models/checkpoints/m.safetensors"
    oss.server.put(BUCKET, key, blob)
    storage = make_storage(oss, tmp_path, download_workers=1)
    storage.prepare()
    # Parts 0-2 arrive (one connection at a time), then every request fails: a clear error, no file.
    oss.server.faults.fail("GET", "m.safetensors", times=1000, after=3)
    final = storage.local_root / "models" / "checkpoints" / "m.safetensors"
    with pytest.raises(TransientStorageError, match="m.safetensors"):
        storage.model_path("checkpoints", "m.safetensors")
    assert not final.exists()
    part, state = part_paths(final)
    assert part.exists() and len(json.loads(state.read_text())["done"]) == 3

    oss.server.faults.clear()
    before = range_gets(oss, key)
    assert Path(storage.model_path("checkpoints", "m.safetensors")).read_bytes() == blob
    assert range_gets(oss, key) - before == 8 - 3  # only the missing parts
    assert not part.exists() and not state.exists()


def test_corrupt_partial_download_is_discarded_never_used(oss, tmp_path: Path) -> None:
    blob = random_bytes(MB, 5)
    key = "data/models/checkpoints/m.safetensors"
    oss.server.put(BUCKET, key, blob)
    storage = make_storage(oss, tmp_path)
    storage.prepare()
    final = storage.local_root / "models" / "checkpoints" / "m.safetensors"
    final.parent.mkdir(parents=True, exist_ok=True)
    part, state = part_paths(final)
    etag = oss.server.buckets[BUCKET][key].etag
    # A resume record claiming every part, over garbage bytes (e.g. a disk error).
    part.write_bytes(b"\0" * len(blob))
    state.write_text(json.dumps({"etag": etag, "size": len(blob), "part_size": 256 * 1024,
                                 "done": {str(i): 12345 for i in range(4)}}))
    with pytest.raises(IntegrityError, match="CRC64"):
        storage.model_path("checkpoints", "m.safetensors")
    assert not final.exists() and not part.exists() and not state.exists()
    assert Path(storage.model_path("checkpoints", "m.safetensors")).read_bytes() == blob


def test_wrong_secret_is_reported_clearly(oss, tmp_path: Path) -> None:
    oss.server.put(BUCKET, "data/custom_nodes/a.py", b"")
    storage = make_storage(oss, tmp_path, access_key_secret="wrong")
    with pytest.raises(StorageAuthError, match="SignatureDoesNotMatch.*OSS_ACCESS_KEY_SECRET"):
        storage.prepare()
    assert not any(f[0] for f in oss.server.faults.fired)


def test_sts_token_is_sent_and_checked(oss, tmp_path: Path) -> None:
    oss.server.sts_tokens[KEY_ID] = "tok-1"
    oss.server.put(BUCKET, "data/models/vae/v.pt", b"v")
    with pytest.raises(StorageAuthError, match="InvalidSecurityToken"):
        make_storage(oss, tmp_path).prepare()
    storage = make_storage(oss, tmp_path, security_token="tok-1")
    storage.prepare()
    assert Path(storage.model_path("vae", "v.pt")).read_bytes() == b"v"
    assert "security-token=tok-1" in storage.url_for(storage.local_root / "models" / "vae" / "v.pt")


# -- cache bound -------------------------------------------------------------------------------

def test_cache_evicts_least_recently_used_but_never_a_file_in_use(oss, tmp_path: Path) -> None:
    for name in "abcd":
        oss.server.put(BUCKET, f"data/models/loras/{name}.pt", random_bytes(MB, ord(name)))
    storage = make_storage(oss, tmp_path, cache_max_gb=2.5 * MB / 1024**3)
    storage.prepare()
    cache = storage.cache
    storage.model_path("loras", "a.pt")
    storage.model_path("loras", "b.pt")
    storage.task_finished()
    storage.model_path("loras", "a.pt")  # a is now more recent than b
    storage.model_path("loras", "c.pt")  # held by the running task together with a
    assert sorted(cache.cached()) == ["loras/a.pt", "loras/c.pt"]
    assert not (cache.root / "loras" / "b.pt").exists()
    storage.model_path("loras", "d.pt")  # a and c in use: over the bound rather than fail
    assert sorted(cache.cached()) == ["loras/a.pt", "loras/c.pt", "loras/d.pt"]
    storage.task_finished()
    storage.model_path("loras", "b.pt")
    assert cache.used_bytes <= 2.5 * MB
    assert "loras/b.pt" in cache.cached()


def test_a_model_larger_than_the_cache_is_refused(oss, tmp_path: Path) -> None:
    oss.server.put(BUCKET, "data/models/loras/huge.pt", random_bytes(MB))
    storage = make_storage(oss, tmp_path, cache_max_gb=0.5 * MB / 1024**3)
    storage.prepare()
    with pytest.raises(CacheFullError, match="--cache-max-gb"):
        storage.model_path("loras", "huge.pt")


def test_prefetch_downloads_every_model(oss, tmp_path: Path) -> None:
    for name in "ab":
        oss.server.put(BUCKET, f"data/models/vae/{name}.pt", random_bytes(300_000, ord(name)))
    storage = make_storage(oss, tmp_path, prefetch_models=True)
    storage.prepare()
    assert sorted(storage.cache.cached()) == ["vae/a.pt", "vae/b.pt"]


# -- uploads and URLs --------------------------------------------------------------------------

def test_outputs_are_uploaded_with_signed_urls(oss, tmp_path: Path) -> None:
    storage = make_storage(oss, tmp_path)
    out = storage.local_root / "output"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "img_00001_.png").write_bytes(b"png-bytes")
    (out / "big.bin").write_bytes(random_bytes(MB + 5, 9))
    result = {"outputs": {"9": {"images": [
        {"filename": "img_00001_.png", "subfolder": "sub", "type": "output"},
        {"filename": "preview.png", "subfolder": "", "type": "temp"},
    ]}, "10": {"files": [{"filename": "big.bin", "subfolder": "", "type": "output"}]}}}
    count = storage.publish_outputs(result["outputs"], {"output": out, "temp": storage.local_root / "temp"})
    assert count == 2
    assert oss.server.get(BUCKET, "data/output/sub/img_00001_.png") == b"png-bytes"
    url = result["outputs"]["9"]["images"][0]["url"]
    assert "Signature=" in url and "Expires=" in url
    assert requests.get(url, timeout=10).content == b"png-bytes"
    assert "url" not in result["outputs"]["9"]["images"][1]
    # Tampered or expired URLs are refused by the bucket.
    assert requests.get(url.replace("img_00001_", "img_00002_"), timeout=10).status_code == 403


def test_multipart_upload_through_the_sdk(oss, tmp_path: Path) -> None:
    storage = make_storage(oss, tmp_path)
    path = tmp_path / "big.bin"
    blob = random_bytes(3 * MB + 7, 11)
    path.write_bytes(blob)
    storage.client.put_file("data/output/big.bin", path, multipart_threshold=MB, part_size=MB)
    assert oss.server.get(BUCKET, "data/output/big.bin") == blob
    assert oss.server.buckets[BUCKET]["data/output/big.bin"].etag.endswith("-4")
    assert oss.server.uploads == {}


def test_mounted_data_dir_gets_signed_urls_or_a_url_base(oss, tmp_path: Path) -> None:
    settings = storage_settings(oss, tmp_path, mounted=True)
    root = tmp_path / "mounted"
    storage = ObjectStorage(settings, root)
    (root / "output").mkdir(parents=True)
    (root / "output" / "a.png").write_bytes(b"A")
    oss.server.put(BUCKET, "data/output/a.png", b"A")  # the mount put it there
    result = {"outputs": {"1": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}}}
    assert storage.publish_outputs(result["outputs"], {"output": root / "output"}) == 0
    assert requests.get(result["outputs"]["1"]["images"][0]["url"], timeout=10).content == b"A"

    from dataclasses import replace

    based = ObjectStorage(replace(settings, output_url_base="https://cdn.example/dd"), root)
    based.publish_outputs(result["outputs"], {"output": root / "output"})
    assert result["outputs"]["1"]["images"][0]["url"] == "https://cdn.example/dd/output/a.png"


def test_sdk_sees_oss_errors_from_the_test_server(oss) -> None:
    bucket = oss2.Bucket(oss2.Auth(KEY_ID, SECRET), oss.endpoint, BUCKET)
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object("nope")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        oss2.Bucket(oss2.Auth(KEY_ID, SECRET), oss.endpoint, "no-such-bucket").get_object("x")
    bucket.put_object("r.bin", b"0123456789")
    assert bucket.get_object("r.bin", byte_range=(2, 5)).read() == b"2345"
    assert bucket.get_object("r.bin", byte_range=(None, 3)).read() == b"789"
    head = bucket.head_object("r.bin")
    assert head.content_length == 10 and head.headers["x-oss-hash-crc64ecma"]


def test_client_needs_credentials(tmp_path: Path) -> None:
    from standard.storage import StorageSettings

    with pytest.raises(StorageConfigError):
        OssClient(StorageSettings(endpoint="http://127.0.0.1:1"), OssLocation("abc"))


def test_test_server_can_answer_from_disk(tmp_path: Path) -> None:
    """The benchmark's mode: objects on disk, GETs with sendfile; same bytes and ranges."""
    from oss_server import OssTestServer, start_in_thread

    running = start_in_thread(OssTestServer({KEY_ID: SECRET}, store_dir=tmp_path))
    try:
        running.server.create_bucket(BUCKET)
        bucket = oss2.Bucket(oss2.Auth(KEY_ID, SECRET), running.endpoint, BUCKET)
        blob = random_bytes(MB + 3, 12)
        bucket.put_object("k", blob)
        bucket.put_object("k", blob[::-1])  # replaced: the old copy on disk goes
        assert len(list(tmp_path.iterdir())) == 1
        assert bucket.get_object("k").read() == blob[::-1]
        assert bucket.get_object("k", byte_range=(10, 20)).read() == blob[::-1][10:21]
    finally:
        running.stop()


def test_instances_sharing_a_cache_dir_download_once(oss, tmp_path: Path) -> None:
    """Local instances of one machine (API edition) may share --cache-dir."""
    blob = random_bytes(2 * MB, 13)
    key = "data/models/checkpoints/shared.safetensors"
    oss.server.put(BUCKET, key, blob)
    oss.server.faults.slow("shared", delay_s=0.02)
    first, second = make_storage(oss, tmp_path), make_storage(oss, tmp_path)
    first.prepare()
    second.prepare()
    paths: list[str] = []
    threads = [threading.Thread(target=lambda s=s: paths.append(s.model_path("checkpoints", "shared.safetensors")))
               for s in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and Path(paths[0]).read_bytes() == blob
    assert range_gets(oss, key) == 8  # one download of 8 parts, adopted by the other
