"""Which model files a workflow graph loads: the string inputs of its nodes that name a model file.

Loader nodes take their model as a file name input (``ckpt_name``, ``unet_name``, ``lora_name``,
``vae_name``, ...); whatever the input is called, its value ends with a model file's suffix. Both
editions schedule by it: the cluster prefers an instance that ran the task's models last, the API
edition tags each task with them (``model_key``) so a worker's watch can prefer tasks whose models its
instance already holds. A graph whose models cannot be told yields none and is scheduled as usual.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
MAX_KEY_CHARS = 200  # a longer list is named by its digest: the key travels as a queue tag


def is_model_file(value: str) -> bool:
    return value.lower().endswith(MODEL_SUFFIXES)


def models_of(graph: Any) -> list[str]:
    """The sorted model file names a graph's nodes load ([] when the graph is not one or names none)."""
    if not isinstance(graph, dict):
        return []
    found: set[str] = set()
    for node in graph.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            found.update(v for v in inputs.values() if isinstance(v, str) and is_model_file(v))
    return sorted(found)


def model_key(models: Iterable[str]) -> str:
    """One short printable name for a set of models ("" for none): the names joined, or their digest."""
    names = sorted(set(models))
    joined = ",".join(names)
    if len(joined) <= MAX_KEY_CHARS and joined.isprintable():
        return joined
    return "sha256:" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:32]
