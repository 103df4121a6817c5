"""What the engine reads from a node class, as a type: ComfyUI's node convention.

Built-in nodes and ``custom_nodes`` plugins are plain classes with a
``INPUT_TYPES()`` classmethod and a ``FUNCTION`` attribute naming the method
to call; everything else (``RETURN_TYPES``, ``OUTPUT_NODE``, ``IS_CHANGED``...)
is optional and read with ``getattr``.
"""

from __future__ import annotations

from typing import Any, Protocol


class NodeClass(Protocol):
    FUNCTION: str

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]: ...


# NODE_CLASS_MAPPINGS: node classes by the name a workflow's ``class_type`` gives.
NodeClasses = dict[str, type[NodeClass]]
