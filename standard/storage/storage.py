"""``ObjectStorage``: everything an instance does with its bucket, behind one object.

- oss:// data dir: ``prepare()`` syncs ``custom_nodes/`` down and lists
  ``models/`` and ``input/``; ``model_path()`` fetches a model into the cache on
  first use (or ``prefetch()`` does all of them), ``input_path()`` an input
  image into the local ``input/``; outputs and uploads go up to the bucket.
- mounted data dir with ``--oss-bucket``: nothing to sync or upload (the mount
  does it); outputs get signed URLs of their keys.
- ``--output-url-base``: outputs get ``base/<path in the data dir>`` URLs.

Blocking methods (all but the small getters) run in threads.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..model_files import models_of
from ..paths import resolve_inside
from .cache import ModelCache
from .client import OssClient
from .download import ProgressCallback
from .errors import ObjectNotFound, StorageError
from .listing import BucketListing
from .settings import StorageSettings
from .sync import sync_down

log = logging.getLogger("comfyserve.storage")
OUTPUT_LIST_KEYS_SKIP = frozenset({"text", "animated"})
INPUT_LOCKS_DIR = ".oss-locks"  # hidden: LoadImage and /internal/files skip dot names
MAX_INPUT_PROBES = 64  # HEADs of names a prompt refers to that the last listing lacks (one task's inputs)
_INPUT_ANNOTATION = " [input]"
_FILE_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,1024}\.[A-Za-z0-9]{1,8}")  # "name.ext": text values do not look up


class ObjectStorage:
    def __init__(self, settings: StorageSettings, local_root: Path) -> None:
        self.settings = settings
        self.local_root = Path(local_root)
        self.location = settings.bucket_location
        self.client: OssClient | None = None
        if self.location is not None:
            self.client = OssClient(settings, self.location, pool_size=settings.download_workers * 2 + 4)
        self.remote_models = settings.location is not None
        self.remote_inputs = settings.location is not None
        self.uploads_outputs = settings.location is not None
        self.input_root = (self.local_root / "input").resolve()
        self.cache: ModelCache | None = None
        self.models: BucketListing | None = None  # "folder/name" under models/
        self.input_cache: ModelCache | None = None
        self.inputs: BucketListing | None = None  # names under input/, subfolders as "sub/name"
        if self.remote_models:
            assert self.client is not None and self.location is not None
            self.cache = ModelCache(
                self.client, self.location.key("models") + "/", self.local_root / "models",
                max_bytes=settings.cache_max_bytes, part_size=settings.part_size_bytes,
                workers=settings.download_workers)
            self.models = BucketListing(self.client, self.location.key("models") + "/", self.cache.root)
            self.input_cache = ModelCache(
                self.client, self.location.key("input") + "/", self.input_root, max_bytes=None,
                part_size=settings.part_size_bytes, workers=settings.download_workers,
                lock_root=self.input_root / INPUT_LOCKS_DIR, label="input")
            self.inputs = BucketListing(self.client, self.location.key("input") + "/", self.input_root,
                                        ttl_s=settings.input_list_ttl_s)
        self._task_holds: list[str] = []
        # Inputs found by ``probe_inputs`` (put in the bucket for one task, e.g. API task inputs): their
        # local copies go after the task that fetched them, not kept for ever on every instance.
        self._probed: set[str] = set()
        self._holds_lock = threading.Lock()
        self.uploaded: list[str] = []  # keys uploaded (tests, logs)
        # path -> (size, mtime_ns) as uploaded: a file reported twice (executed event, then
        # history; or a cached node) goes up once.
        self._published: dict[Path, tuple[int, int]] = {}
        self._published_lock = threading.Lock()

    # -- start / restart -------------------------------------------------------

    def prepare(self) -> None:
        """At start and on /restart: custom_nodes down, models and inputs listed, models optionally prefetched."""
        if not self.remote_models:
            return
        assert self.client is not None and self.location is not None
        assert self.models is not None and self.inputs is not None
        started = time.monotonic()
        sync_down(self.client, self.location.key("custom_nodes") + "/", self.local_root / "custom_nodes",
                  workers=self.settings.download_workers)
        self.models.refresh()
        self.inputs.refresh()
        log.info("bucket %s ready in %.2fs: %d model files, %d inputs listed", self.location,
                 time.monotonic() - started, len(self.models), len(self.inputs))
        if self.settings.prefetch_models:
            self.prefetch()

    def close(self) -> None:
        """The instance stops: no more background listings."""
        if self.inputs is not None:
            self.inputs.close()

    def prefetch(self) -> None:
        """Every listed model into the cache (largest first, so the long ones start early)."""
        cache = self.cache
        assert cache is not None and self.models is not None
        todo = sorted(((rel, info) for rel, info in self.models.entries().items() if "/" in rel),
                      key=lambda item: -item[1].size)
        log.info("prefetching %d models (%.1f MB)", len(todo), sum(i.size for _, i in todo) / 1024**2)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="oss-prefetch") as pool:
            list(pool.map(lambda item: cache.ensure(item[0], item[1]), todo))

    # -- models ----------------------------------------------------------------

    def model_names(self, folder: str) -> list[str]:
        """Names (relative to ``models/<folder>/``) of the folder's files in the bucket."""
        assert self.models is not None
        return self.models.names(folder.rstrip("/") + "/")

    def model_path(self, folder: str, filename: str, *, progress: ProgressCallback | None = None) -> str | None:
        """The local path of a model, fetched on first use; None when neither bucket nor disk has it.

        Called on the execution thread by ``folder_paths.get_full_path``; the file
        stays out of eviction until the running task ends (``task_finished``).
        """
        assert self.cache is not None and self.models is not None
        rel = f"{folder}/{filename}"
        try:
            local = resolve_inside(self.cache.root, rel)
        except ValueError:
            return None
        info = self.models.get(rel)
        if info is None:
            return str(local) if local.is_file() else None
        self.cache.acquire(rel)
        with self._holds_lock:
            self._task_holds.append(rel)
        return str(self.cache.ensure(rel, info, progress=progress))

    def fetch_models(self, prompt: dict[str, Any]) -> list[str]:
        """For an instance that reads only its local ``models/`` (real ComfyUI behind our front): the listed
        model files ``prompt`` names (``model_files.models_of``; in every folder that has the name) fetched into the
        cache before the prompt is validated, each kept out of eviction until ``release_models``. Returns the
        ``folder/name`` of each. Blocking; a file that cannot be fetched is left to validation (logged)."""
        names = set(models_of(prompt)) if self.remote_models else set()
        if not names:
            return []
        assert self.cache is not None and self.models is not None
        held = []
        for rel, info in self.models.entries().items():
            if rel.partition("/")[2] not in names:
                continue
            self.cache.acquire(rel)
            held.append(rel)
            try:
                self.cache.ensure(rel, info)
            except StorageError as exc:
                log.warning("fetching model %s from the bucket failed: %s", rel, exc)
        return held

    def release_models(self, rels: list[str]) -> None:
        """The prompt that needed these models (``fetch_models``) is done: the cache may evict them."""
        if self.cache is not None:
            for rel in rels:
                self.cache.release(rel)

    def task_finished(self) -> None:
        """Let the cache evict what the finished task used."""
        self.forget_published()
        with self._holds_lock:
            holds, self._task_holds = self._task_holds, []
        if self.cache is not None:
            for rel in holds:
                self.cache.release(rel)
        self._drop_probed_inputs()

    def forget_published(self) -> None:
        """The files of the finished task are not looked for again (``publish_outputs`` sends each once)."""
        with self._published_lock:
            self._published.clear()

    def _drop_probed_inputs(self) -> None:
        """The local copies of probed inputs the finished task fetched go (and their listing entries)."""
        if self.input_cache is None or self.inputs is None:
            return
        with self._holds_lock:
            fetched = {rel for rel in self._probed if self.input_cache.is_cached(rel)}
            self._probed -= fetched
        for rel in fetched:
            if self.input_cache.drop(rel):
                self.inputs.forget(rel)

    # -- inputs ----------------------------------------------------------------

    def input_rel(self, local_path: Path) -> str | None:
        """The name under ``input/`` of a (resolved) local path, None when it lies elsewhere."""
        if not self.remote_inputs:
            return None
        path = Path(local_path)
        if not path.is_relative_to(self.input_root) or path == self.input_root:
            return None
        return path.relative_to(self.input_root).as_posix()

    def input_names(self) -> list[str]:
        """Names under ``input/`` in the bucket (last listing; an old one is refreshed in the background)."""
        return self.inputs.names() if self.inputs is not None else []

    def has_input(self, local_path: Path) -> bool:
        """Does the last listing of the bucket's ``input/`` hold this file? (No request is made.)"""
        rel = self.input_rel(local_path)
        return rel is not None and self.inputs is not None and self.inputs.get(rel) is not None

    def probe_inputs(self, prompt: dict[str, Any]) -> int:
        """Before a prompt is validated: look up in the bucket the input names it refers to that neither
        the disk nor the last listing of ``input/`` has (put there since, e.g. an API task's inputs), so
        they pass validation now rather than after ``--input-list-ttl``. One HEAD per name, at most
        ``MAX_INPUT_PROBES`` per prompt; names that leave ``input/`` are never asked for. Blocking; how
        many were found."""
        found = 0
        for rel in self._unknown_inputs(prompt):
            try:
                if self.inputs is not None and self.inputs.probe(rel) is not None:
                    found += 1
                    with self._holds_lock:
                        self._probed.add(rel)
            except StorageError as exc:  # validation refuses the name, as with no bucket at all
                log.warning("looking up input %s in the bucket failed: %s", rel, exc)
        return found

    def _unknown_inputs(self, prompt: dict[str, Any]) -> Iterator[str]:
        """The input names of a prompt that neither the disk nor the last listing has, at most
        ``MAX_INPUT_PROBES`` of them; none leaving ``input/``."""
        if not self.remote_inputs:
            return
        assert self.inputs is not None
        probes = 0
        for rel in _input_names(prompt):
            if self.inputs.get(rel) is not None:
                continue
            try:
                if resolve_inside(self.input_root, rel).is_file():
                    continue
            except ValueError:
                continue
            if probes >= MAX_INPUT_PROBES:
                log.warning("not looking up more than %d unlisted input names of one prompt", MAX_INPUT_PROBES)
                return
            probes += 1
            yield rel

    def fetch_inputs(self, prompt: dict[str, Any]) -> list[str]:
        """For an instance that reads only its local ``input/`` (real ComfyUI behind our front): the input
        names of ``prompt`` that the disk lacks are downloaded now, before the prompt is validated, whether
        the listing has them or a look-up finds them (as ``probe_inputs`` does). Returns the prompt's names
        that came from such a look-up (now or for an earlier prompt), whose copies go with ``drop_inputs``
        once no prompt needs them; a listed input's copy stays, as the embedded engine keeps it. Blocking;
        a name that cannot be fetched is left to validation (logged)."""
        self.probe_inputs(prompt)
        if not self.remote_inputs:
            return []
        assert self.inputs is not None
        looked_up = []
        for rel in _input_names(prompt):
            with self._holds_lock:
                probed = rel in self._probed
            if not probed and self.inputs.get(rel) is None:
                continue
            try:
                if self.input_path(self.input_root / rel) is not None and probed:
                    looked_up.append(rel)
            except StorageError as exc:
                log.warning("fetching input %s from the bucket failed: %s", rel, exc)
        return looked_up

    def drop_inputs(self, rels: list[str]) -> None:
        """The local copies of looked-up inputs (``fetch_inputs``) that no prompt needs any more go."""
        if self.input_cache is None or self.inputs is None:
            return
        for rel in rels:
            with self._holds_lock:
                self._probed.discard(rel)
            if self.input_cache.drop(rel):
                self.inputs.forget(rel)

    def input_path(self, local_path: Path) -> Path | None:
        """Make an input present under its local path, fetched from the bucket when missing or outdated.

        A local file wins unless it was fetched from an older version of the object.
        A name the listing does not know yet costs one HEAD. None: neither the disk
        nor the bucket has it (or the path is not under ``input/``). Blocking; raises StorageError.
        """
        rel = self.input_rel(local_path)
        if rel is None:
            return None
        assert self.inputs is not None and self.input_cache is not None
        local = resolve_inside(self.input_root, rel)
        info = self.inputs.get(rel)
        if local.is_file() and (info is None or not self.input_cache.is_outdated(rel, info)):
            return local
        try:
            return self.input_cache.ensure(rel, info)
        except ObjectNotFound:
            return None

    # -- outputs, uploads, URLs ------------------------------------------------

    def data_key(self, local_path: Path) -> str:
        """The object key of a file under the local data dir root."""
        assert self.location is not None
        rel = Path(local_path).resolve().relative_to(self.local_root.resolve()).as_posix()
        return self.location.key(rel)

    def url_for(self, local_path: Path) -> str | None:
        """A URL API clients can fetch the file from without reaching the instance."""
        rel = Path(local_path).resolve().relative_to(self.local_root.resolve()).as_posix()
        if self.settings.output_url_base:
            return f"{self.settings.output_url_base}/{quote(rel)}"
        if self.client is None:
            return None
        return self.client.sign_url(self.data_key(local_path), self.settings.url_expires_s)

    def upload(self, local_path: Path) -> str:
        """Put a local data-dir file at its key; returns the key."""
        assert self.client is not None
        key = self.data_key(local_path)
        self.client.put_file(key, Path(local_path))
        self.uploaded.append(key)
        return key

    def publish_outputs(self, outputs: dict[str, Any], folders: dict[str, Path]) -> int:
        """Upload output files (oss:// data dir) and add a fresh ``url`` to each entry, in place.

        ``outputs`` is a history's ``outputs`` map (node -> ui output); ``folders``
        maps ComfyUI's ``type`` ("output", ...) to its local folder. Entries whose
        file is missing or fails to upload get no URL (logged). Returns the number
        of files uploaded (files already uploaded unchanged are not sent again).
        """
        uploaded = 0
        for entry in _file_entries(outputs):
            root = folders.get(entry.get("type", "output"))
            if root is None or entry.get("type") != "output":
                continue
            try:
                path = resolve_inside(resolve_inside(root, entry.get("subfolder") or ""), entry["filename"])
            except ValueError:
                continue
            if not path.is_file():
                continue
            try:
                if self.uploads_outputs:
                    stat = path.stat()
                    version = (stat.st_size, stat.st_mtime_ns)
                    with self._published_lock:
                        done = self._published.get(path) == version
                    if not done:
                        self.upload(path)
                        uploaded += 1
                        with self._published_lock:
                            self._published[path] = version
                url = self.url_for(path)
            except (StorageError, OSError, ValueError) as exc:
                log.error("output %s not published: %s", path.name, exc)
                continue
            if url:
                entry["url"] = url
        return uploaded

    def remote_url(self, local_path: Path) -> str | None:
        """For /view of a file not on local disk: a signed URL if the bucket has it."""
        if self.client is None:
            return None
        try:
            key = self.data_key(local_path)
            self.client.head(key)
        except (ObjectNotFound, ValueError):
            return None
        return self.url_for(local_path)


def _input_names(prompt: dict[str, Any]) -> list[str]:
    """The node input values of a prompt that look like an input file's name (``x.png``, ``sub/x.png``,
    optionally ``[input]``-annotated), without repeats, in graph order."""
    names: dict[str, None] = {}
    for node in prompt.values():
        values = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(values, dict):
            continue
        for value in values.values():
            if not isinstance(value, str):
                continue
            value = value.removesuffix(_INPUT_ANNOTATION)
            if _FILE_NAME.fullmatch(value):
                names[value] = None
    return list(names)


def _file_entries(outputs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every ``{"filename", "subfolder", "type"}`` dict in a history's ``outputs``."""
    for node_output in outputs.values():
        if not isinstance(node_output, dict):
            continue
        for name, items in node_output.items():
            if name in OUTPUT_LIST_KEYS_SKIP or not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    yield item
