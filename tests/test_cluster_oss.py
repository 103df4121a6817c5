"""Cluster edition on a bucket: a user's outputs go to PREFIX/users/<name>/output with signed URLs."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from oss_server.fixtures import BUCKET, KEY_ID, SECRET, storage_settings

from cluster_proxy.command import settings_from_args
from standard.cli import build_parser
from support.cluster import graph


def test_cluster_flags_pass_the_bucket_to_spawned_instances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", SECRET)
    args = build_parser().parse_args([
        "cluster", "--data-dir", f"oss://{BUCKET}/data", "--oss-endpoint", "http://127.0.0.1:9",
        "--cache-dir", str(tmp_path / "cache"), "--instances", "2"])
    settings = settings_from_args(args)
    assert settings.data_dir == tmp_path / "cache" / "data"
    flags = list(settings.instance_args)
    assert flags[flags.index("--data-dir") + 1].rstrip("/") == f"oss://{BUCKET}/data"
    assert SECRET not in " ".join(flags)


async def test_users_outputs_are_uploaded_under_their_own_prefix(start_cluster, oss, tmp_path: Path) -> None:
    cluster = await start_cluster(instances=1, storage=storage_settings(oss, tmp_path))
    async with cluster.user("alice") as alice:
        result = await alice.run(graph("mine"), timeout_s=30)
    assert result.ok, result.error
    image = next(iter(result.outputs.values()))["images"][0]
    key = f"data/users/alice/output/{image['subfolder'] + '/' if image['subfolder'] else ''}{image['filename']}"
    stored = oss.server.get(BUCKET, key)
    assert stored is not None and stored[:4] == b"\x89PNG"
    assert image["url"].startswith(oss.endpoint)
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(image["url"])).content == stored
    assert not any(k.startswith("data/output/") or "/users/bob/" in k for k in oss.server.buckets[BUCKET])
