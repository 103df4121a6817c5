"""Mirror a prefix of the bucket (``custom_nodes/``) into a local folder at start.

Unchanged files (same ETag as last time, recorded in a manifest) are skipped;
files that left the bucket since the last sync are removed locally (only files
an earlier sync wrote - nothing else in the folder is touched). Each file is
written to a temporary name, checked (size, and MD5 for plain ETags) and
renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..paths import resolve_inside
from .client import ObjectInfo, OssClient
from .download import download_object
from .errors import IntegrityError
from .listing import safe_entries

log = logging.getLogger("comfyserve.storage")
MANIFEST_NAME = ".oss-sync.json"
LARGE_FILE_BYTES = 32 * 1024 * 1024


def sync_down(client: OssClient, prefix: str, local_dir: Path, *, workers: int = 8) -> dict[str, int]:
    """Bring ``local_dir`` up to date with ``prefix``; returns counts (fetched, kept, removed)."""
    local_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = local_dir / MANIFEST_NAME
    try:
        manifest: dict[str, str] = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    remote = safe_entries(client, prefix, local_dir)
    todo = [rel for rel, info in remote.items()
            if manifest.get(rel) != info.etag or not (local_dir / rel).is_file()]

    def fetch(rel: str) -> None:
        _fetch(client, remote[rel], resolve_inside(local_dir, rel))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oss-sync") as pool:
        list(pool.map(fetch, todo))
    removed = 0
    for rel in set(manifest) - set(remote):
        with contextlib.suppress(FileNotFoundError, ValueError):
            resolve_inside(local_dir, rel).unlink()
            removed += 1
    manifest = {rel: info.etag for rel, info in remote.items()}
    tmp = manifest_path.with_name(f"{MANIFEST_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=0))
    os.replace(tmp, manifest_path)
    counts = {"fetched": len(todo), "kept": len(remote) - len(todo), "removed": removed}
    log.info("synced %s -> %s: %s", prefix, local_dir, counts)
    return counts


def _fetch(client: OssClient, info: ObjectInfo, path: Path) -> None:
    if info.size > LARGE_FILE_BYTES:  # e.g. weights shipped inside a plugin: ranged, resumable
        download_object(client, client.head(info.key), path, part_size=LARGE_FILE_BYTES // 4, workers=4)
        return
    data = client.get_bytes(info.key)
    if len(data) != info.size:
        raise IntegrityError(f"{info.key}: got {len(data)} bytes, the listing says {info.size}")
    if "-" not in info.etag and len(info.etag) == 32 and hashlib.md5(data).hexdigest().upper() != info.etag.upper():
        raise IntegrityError(f"{info.key}: MD5 does not match its ETag")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.oss-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
