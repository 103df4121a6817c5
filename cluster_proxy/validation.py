"""ComfyUI's own validation answer for ``POST /prompt``, given by the proxy itself.

ComfyUI checks a graph before queueing it and answers 400 with
``node_errors``, which the frontend paints onto the nodes. Instances only see
a task when it runs, so the proxy keeps an embedded-engine node registry of
the same data dir and validates the graph as the instance will see it (the
user's files staged, see ``graph.stage_graph``). It does so only while the
pool's node set is exactly the registry's (an embedded-engine pool on the same
plugins); a pool running real ComfyUI, or anything else, is left to report
its own errors when the task runs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from standard.datadir import DataDir, WorkDirs

from .graph import remove_stage, stage_graph

log = logging.getLogger("comfyserve.cluster.validation")


class LocalValidator:
    def __init__(self, data_dir: DataDir) -> None:
        self.data_dir = data_dir
        self._registry: Any = None
        self._classes: frozenset[str] = frozenset()
        self._lock = asyncio.Lock()
        self._failed = False

    async def _registry_matching(self, pool_classes: frozenset[str]) -> Any:
        """The local registry when it has exactly the pool's nodes (reloaded once when plugins changed)."""
        if self._failed:
            return None
        async with self._lock:
            if self._registry is None or self._classes != pool_classes:
                try:
                    from standard.engine import NodeRegistry

                    registry = NodeRegistry(self.data_dir, self.data_dir.workdirs())
                    await asyncio.to_thread(registry.load)
                except Exception:  # no engine here: the instances validate when the task runs
                    log.exception("no local validation: the embedded engine does not load")
                    self._failed = True
                    return None
                self._registry, self._classes = registry, frozenset(registry.node_classes)
        return self._registry if self._classes == pool_classes else None

    async def validate(self, prompt: dict[str, Any], targets: list[str] | None, pool_info: dict[str, Any] | None,
                       workdirs: WorkDirs) -> tuple[bool, dict[str, Any] | None, dict[str, Any]] | None:
        """(valid, error, node_errors) as ComfyUI answers, or None when the proxy cannot judge."""
        if not pool_info:
            return None
        registry = await self._registry_matching(frozenset(pool_info))
        if registry is None:
            return None
        key = f"validate-{uuid.uuid4().hex}"
        return await asyncio.to_thread(self._validate, registry, prompt, targets, key, workdirs)

    def _validate(self, registry: Any, prompt: dict[str, Any], targets: list[str] | None, key: str,
                  workdirs: WorkDirs) -> tuple[bool, dict[str, Any] | None, dict[str, Any]]:
        from standard.engine import context as engine_context
        from standard.engine import validate_prompt

        try:
            staged = stage_graph(prompt, key, workdirs, self.data_dir)
            with engine_context.use(registry.context):
                valid, error, _outputs, node_errors = validate_prompt(registry, key, staged, targets)
        finally:
            remove_stage(key, self.data_dir)
        return bool(valid), _unstaged(error, key), _unstaged(node_errors, key)


def _unstaged(value: Any, key: str) -> Any:
    """Error texts name the staged paths; show the user their own names."""
    if isinstance(value, dict):
        return {k: _unstaged(v, key) for k, v in value.items()}
    if isinstance(value, list):
        return [_unstaged(v, key) for v in value]
    if isinstance(value, str) and key in value:
        for kind in ("input", "output", "temp"):
            value = value.replace(f".cluster/{key}/{kind}/", "")
        return value.replace(f".cluster/{key}/", "")
    return value
