"""Helpers for the drain tests (no tests here): an interruptible gate node that counts its runs.

The gate node of ``support.server`` ignores interrupts; these tests need one that a
drain's timeout can cut, and that says when (and how often) it started: ``input/<gate>.runs``
gets a line per run, so "ran exactly once more" is visible on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DRAIN_GATE_PLUGIN = '''
"""Test plugin: holds its prompt until input/<gate> exists; interruptible; logs each run."""
import time
from pathlib import Path

import comfy.model_management

INPUT_DIR = Path(__file__).resolve().parent.parent / "input"


class TestDrainGate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "gate": ("STRING", {"default": "gate"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "wait"
    CATEGORY = "testing"

    def wait(self, image, gate):
        with open(INPUT_DIR / (gate + ".runs"), "a") as runs:
            runs.write("run\\n")
        deadline = time.monotonic() + 60
        while not (INPUT_DIR / gate).exists():
            comfy.model_management.throw_exception_if_processing_interrupted()
            if time.monotonic() > deadline:
                raise RuntimeError("gate " + gate + " never opened")
            time.sleep(0.005)
        return (image,)


NODE_CLASS_MAPPINGS = {"TestDrainGate": TestDrainGate}
'''


def install_drain_gate(data_dir: Path) -> None:
    (data_dir / "custom_nodes" / "test_drain_gate.py").write_text(DRAIN_GATE_PLUGIN)


def drain_gate_graph(gate: str, prefix: str) -> dict[str, Any]:
    """EmptyImage -> TestDrainGate(gate) -> SaveImage(prefix)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "TestDrainGate", "inputs": {"image": ["1", 0], "gate": gate}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def runs_of(data_dir: Path, gate: str) -> int:
    """How many times the gate node has started."""
    path = data_dir / "input" / f"{gate}.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0
