"""Moving what a task wrote into its user's folders, and pointing its results there.

Runs on the proxy (which mounts the same ``DIR`` as the instances) in a
thread. Every file item ``{"filename", "subfolder", "type"}`` of an
``executed`` event or of the history is brought over before the user sees the
item, so the frontend's ``/view`` finds it in the user's folder:

* ``output`` under the task's stage folder: moved (a name that is taken in the
  user's folder gets the next free counter, and the item is renamed);
* other ``output`` / ``temp`` files (a preview, a node that ignored the
  prefix): copied, since a cached node may show the same file again;
* at the end, anything still in the stage folder (a node that saved without
  reporting it) is moved as well: whatever a task writes under its prefix
  lands in the user's folder and nowhere else.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from standard.datadir import DataDir, WorkDirs
from standard.errors import PathOutsideRoot
from standard.paths import resolve_inside

from .graph import STAGE

_NAME_LOCK = threading.Lock()  # also guards _LAST_COUNTER
MAX_REMEMBERED_COUNTERS = 4096
_LAST_COUNTER: OrderedDict[tuple[str, str, str, int], int] = OrderedDict()  # (folder, stem, rest, width) -> n
_COUNTER = re.compile(r"^(?P<stem>.*_)(?P<n>\d{5,})(?P<rest>_?\..*)$")


class OutputCollector:
    """Per task attempt: which instance file became which user file."""

    def __init__(self, key: str, data_dir: DataDir, workdirs: WorkDirs, storage: Any = None) -> None:
        self.key = key
        self.data_dir = data_dir
        self.workdirs = workdirs
        self.storage = storage  # ObjectStorage of an oss:// data dir, or None
        self.stage_prefix = f"{STAGE}/{key}"
        self._moved: dict[tuple[str, str, str], tuple[str, str]] = {}

    # -- items ------------------------------------------------------------------

    def collect(self, outputs: Any) -> Any:
        """``rewrite_outputs``, then (with a bucket) each of the user's files uploaded and given a ``url``."""
        outputs = self.rewrite_outputs(outputs)
        if self.storage is not None and isinstance(outputs, dict):
            self.storage.publish_outputs(outputs, {"output": self.workdirs.output})
        return outputs

    def rewrite_outputs(self, outputs: Any) -> Any:
        """A node's UI output (or a history ``outputs`` map) with every file item brought over."""
        if isinstance(outputs, dict):
            return {k: self.rewrite_outputs(v) for k, v in outputs.items()}
        if isinstance(outputs, list):
            return [self._item(v) if _is_file_item(v) else self.rewrite_outputs(v) for v in outputs]
        return outputs

    def _item(self, item: dict[str, Any]) -> dict[str, Any]:
        kind = item.get("type") or "output"
        subfolder = str(item.get("subfolder") or "").replace("\\", "/").strip("/")
        filename = str(item["filename"])
        ident = (kind, subfolder, filename)
        if ident in self._moved:
            new_sub, new_name = self._moved[ident]
            return {**item, "subfolder": new_sub, "filename": new_name}
        if kind not in ("output", "temp"):
            return item
        root = self.data_dir.root / kind
        try:
            source = resolve_inside(root, subfolder, filename)
        except PathOutsideRoot:
            return {**item, "filename": "", "subfolder": ""}
        in_stage = kind == "output" and (subfolder + "/").startswith(self.stage_prefix + "/")
        new_sub = subfolder[len(self.stage_prefix):].strip("/") if in_stage else subfolder
        if not source.is_file():
            self._moved[ident] = (new_sub, filename)
            return {**item, "subfolder": new_sub}
        target_dir = resolve_inside(self.workdirs.by_type(kind), new_sub)
        target_dir.mkdir(parents=True, exist_ok=True)
        with _NAME_LOCK:  # two tasks of one user finishing together must not pick one name
            if kind == "temp":
                new_name = filename
                shutil.copy2(source, target_dir / new_name)
            else:
                new_name = _free_name(target_dir, filename)
                if in_stage:
                    shutil.move(source, target_dir / new_name)
                else:
                    shutil.copy2(source, target_dir / new_name)
        self._moved[ident] = (new_sub, new_name)
        return {**item, "subfolder": new_sub, "filename": new_name}

    # -- the rest -----------------------------------------------------------------

    def sweep(self) -> list[str]:
        """Move whatever is left in the stage folder; returns the user-relative paths moved."""
        stage = self.data_dir.root / "output" / STAGE / self.key
        moved: list[str] = []
        if not stage.is_dir():
            return moved
        for path in sorted(stage.rglob("*")):
            if not path.is_file():
                continue
            relative = path.relative_to(stage)
            sub = relative.parent.as_posix() if relative.parent != Path(".") else ""
            item = self._item({"filename": path.name, "subfolder": f"{self.stage_prefix}/{sub}".rstrip("/"),
                               "type": "output"})
            moved.append(f"{item['subfolder']}/{item['filename']}".lstrip("/"))
        return moved


def _is_file_item(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("filename"), str) and "type" in value


def _free_name(folder: Path, filename: str) -> str:
    """``filename``, or the next free counter (``x_00002_.png``) / suffix (``x (1).bin``).

    The last counter given out per (folder, name pattern) is remembered: a folder that
    already holds 20,000 ``x_NNNNN_.png`` is listed once per process, not walked name by
    name for every task (each candidate is still checked on disk: other proxies share it).
    """
    if not (folder / filename).exists():
        return filename
    match = _COUNTER.match(filename)
    if match:
        width = len(match["n"])
        key = (str(folder), match["stem"], match["rest"], width)
        known = _LAST_COUNTER.get(key)
        number = max(int(match["n"]), known if known is not None else _highest(folder, match["stem"], match["rest"]))
        while True:
            number += 1
            candidate = f"{match['stem']}{number:0{width}}{match['rest']}"
            if not (folder / candidate).exists():
                _LAST_COUNTER[key] = number
                _LAST_COUNTER.move_to_end(key)
                while len(_LAST_COUNTER) > MAX_REMEMBERED_COUNTERS:
                    _LAST_COUNTER.popitem(last=False)
                return candidate
    stem, ext = os.path.splitext(filename)
    counter = 1
    while (folder / f"{stem} ({counter}){ext}").exists():
        counter += 1
    return f"{stem} ({counter}){ext}"


def _highest(folder: Path, stem: str, rest: str) -> int:
    """The highest counter of ``{stem}NNNNN{rest}`` names in ``folder`` (0: none)."""
    numbered = re.compile(re.escape(stem) + r"(\d+)" + re.escape(rest) + "$")
    return max((int(m.group(1)) for name in os.listdir(folder) if (m := numbered.match(name))), default=0)
