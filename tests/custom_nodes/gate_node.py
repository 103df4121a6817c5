"""Test plugin (ComfyUI convention): ``TestGate`` holds its prompt until the file ``input/<gate>`` exists.

The one gate node of the tests and the benches (``support.server.install_gate_plugin`` copies this file into
``DIR/custom_nodes``; ``support.server.gated_graph`` builds prompts with it). Its optional inputs choose what a
test needs from it, their defaults being the plain gate:

* ``steps``: report progress 1/``steps`` before waiting (0: none), a task caught mid-run;
* ``interruptible``: stop on an interrupt while waiting, as a sampler does (a drain's timeout can cut it);
* ``count_runs``: append a line to ``input/<gate>.runs`` at each start, so "ran exactly once more" is on disk;
* ``timeout_s``: fail when the gate has not opened by then.

The input folder is found next to this file's folder (``DIR/custom_nodes/..``), which holds under the embedded
engine, the shim and real ComfyUI alike.
"""

import time
from pathlib import Path

import comfy.model_management
import comfy.utils

INPUT_DIR = Path(__file__).resolve().parent.parent / "input"


class TestGate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "gate": ("STRING", {"default": "gate"})},
                "optional": {"steps": ("INT", {"default": 0, "min": 0, "max": 1000}),
                             "interruptible": ("BOOLEAN", {"default": False}),
                             "count_runs": ("BOOLEAN", {"default": False}),
                             "timeout_s": ("FLOAT", {"default": 30.0, "min": 0.0, "max": 3600.0})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "wait"
    CATEGORY = "testing"

    def wait(self, image, gate, steps=0, interruptible=False, count_runs=False, timeout_s=30.0):
        if count_runs:
            with open(INPUT_DIR / (gate + ".runs"), "a") as runs:
                runs.write("run\n")
        if steps:
            comfy.utils.ProgressBar(steps).update_absolute(1, steps)
        deadline = time.monotonic() + timeout_s
        while not (INPUT_DIR / gate).exists():
            if interruptible:
                comfy.model_management.throw_exception_if_processing_interrupted()
            if time.monotonic() > deadline:
                raise RuntimeError("gate " + gate + " never opened")
            time.sleep(0.005)
        return (image,)


NODE_CLASS_MAPPINGS = {"TestGate": TestGate}
NODE_DISPLAY_NAME_MAPPINGS = {"TestGate": "Test Gate"}
