"""Which values of a prompt name a model file: one rule for the cluster proxy (a task's models, for the
instance choice) and a front of real ComfyUI on an oss:// data dir (the models fetched before it validates);
which input files are images (``LoadImage``'s list: the engine's, and the bucket's names the front adds).

Kept free of oss2 imports: the cluster proxy imports it without a bucket.
"""

from __future__ import annotations

import os
from typing import Any

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """An input file ``LoadImage`` lists."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_model_name(value: str) -> bool:
    """A node input value that names a model file (a loader's ``ckpt_name``, ``lora_name``...)."""
    return value.lower().endswith(MODEL_SUFFIXES)


def model_names(prompt: dict[str, Any]) -> list[str]:
    """The model file names a prompt's nodes refer to, sorted, without repeats."""
    names: set[str] = set()
    for node in prompt.values():
        values = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(values, dict):
            names.update(value for value in values.values() if isinstance(value, str) and is_model_name(value))
    return sorted(names)
