"""The embedded engine: runs ComfyUI API-format workflows in-process on NumPy.

``NodeRegistry`` holds the node set (built-ins + ``custom_nodes`` plugins),
``validate_prompt`` answers /prompt with ComfyUI's errors, ``PromptExecutor``
executes with ComfyUI's caching and events.
"""

from .executor import PromptExecutor
from .registry import NodeRegistry
from .validation import validate_prompt

__all__ = ["NodeRegistry", "PromptExecutor", "validate_prompt"]
