"""A simulated GPU as ComfyUI plugin nodes; the benches copy this file into ``DIR/custom_nodes``.

What dominates a shared ComfyUI service on a real GPU is an instance idle
between two tasks and a checkpoint loaded again because the next task needed
another one. These nodes model just that, with sleeps instead of a GPU:

* ``SimCheckpointLoader`` (``ckpt_name``: a file of ``models/checkpoints``, as
  ``CheckpointLoaderSimple``) costs ``load_s`` unless that checkpoint is the
  one in "VRAM": one checkpoint at a time per instance process, kept between
  tasks, lost when the process ends;
* ``SimSampler`` costs ``steps * step_s`` and is the task's output node. It
  reports each step through ``comfy.utils.ProgressBar`` as ComfyUI's KSampler
  does (one update at the end of each step, so ``value == max`` comes as the
  last step ends); the steps are timed from the sampler's start, so the total
  stays ``steps * step_s`` whatever the updates cost. When it ends it
  appends the task's record, one JSON line with microsecond ``time.time()``
  timestamps, to ``DIR/gpu_sim/<pid>.jsonl`` (``DIR`` is the
  folder holding ``custom_nodes``; one file per instance process) and shows
  the same record as its UI output.

A task is ``SimCheckpointLoader -> SimSampler``: its GPU work starts when the
loader starts and ends when the sampler ends, so the time between one task's
end and the next task's start on an instance is what the GPU spent idle.
Both nodes always run (``IS_CHANGED`` is NaN): the "VRAM" is the only cache.
Sleeps are sliced so an interrupt (``/interrupt``, a cancelled task) stops
them as it would stop a sampler.

Plain ComfyUI plugin code (no comfyserve imports): it also loads into ComfyUI.
"""

import json
import os
import threading
import time
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

RECORDS = Path(__file__).resolve().parent.parent / "gpu_sim"
SLICE_S = 0.005

_vram_lock = threading.Lock()
_vram = {"ckpt": None}  # the checkpoint this process holds, or None


_records_file = None


def _record(line):
    """Append one task's record line: the file stays open (line-buffered), so the instrumentation after the
    task's end timestamp is one write, not a mkdir + open + close (~350 us, counted in the gap)."""
    global _records_file
    if _records_file is None:
        RECORDS.mkdir(exist_ok=True)
        _records_file = open(RECORDS / f"{os.getpid()}.jsonl", "a", buffering=1)  # open for the process
    _records_file.write(line)


def now_us():
    return time.time_ns() // 1000


def busy(seconds):
    """Occupy the "GPU" for ``seconds``, stopping at an interrupt."""
    busy_until(time.monotonic() + seconds)


def busy_until(end):
    """Occupy the "GPU" until the monotonic time ``end``, stopping at an interrupt."""
    while True:
        comfy.model_management.throw_exception_if_processing_interrupted()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(SLICE_S, left))


class SimCheckpointLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (folder_paths.get_filename_list("checkpoints"),),
            "load_s": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 600.0, "step": 0.001}),
        }}

    RETURN_TYPES = ("SIM_MODEL",)
    FUNCTION = "load"
    CATEGORY = "gpu_sim"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def load(self, ckpt_name, load_s):
        start_us = now_us()
        with _vram_lock:
            loaded = _vram["ckpt"] != ckpt_name
            if loaded:
                _vram["ckpt"] = None  # evicted; a load cut off by an interrupt leaves nothing loaded
                busy(load_s)
                _vram["ckpt"] = ckpt_name
        model = {"ckpt": ckpt_name, "loaded": loaded, "load_s": load_s, "start_us": start_us,
                 "load_end_us": now_us()}
        return (model,)


class SimSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("SIM_MODEL",),
            "steps": ("INT", {"default": 20, "min": 0, "max": 10000}),
            "step_s": ("FLOAT", {"default": 0.025, "min": 0.0, "max": 60.0, "step": 0.001}),
            "label": ("STRING", {"default": ""}),
        }}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "sample"
    CATEGORY = "gpu_sim"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def sample(self, model, steps, step_s, label):
        sample_start_us = now_us()
        start = time.monotonic()
        record = {"pid": os.getpid(), "label": label, "ckpt": model["ckpt"], "loaded": model["loaded"],
                  "load_s": model["load_s"], "steps": steps, "step_s": step_s, "start_us": model["start_us"],
                  "load_end_us": model["load_end_us"], "sample_start_us": sample_start_us}
        # Serialised now, not after the end timestamp: a cold json.dumps there cost ~90 us of the measured gap.
        head = json.dumps(record)[:-1]
        progress = comfy.utils.ProgressBar(steps)
        for step in range(1, steps + 1):
            busy_until(start + step * step_s)
            progress.update_absolute(step, steps)
        end_us = now_us()
        _record(f'{head}, "end_us": {end_us}}}\n')
        record["end_us"] = end_us
        return {"ui": {"gpu_sim": [record]}, "result": ()}


NODE_CLASS_MAPPINGS = {"SimCheckpointLoader": SimCheckpointLoader, "SimSampler": SimSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"SimCheckpointLoader": "Load Checkpoint (simulated GPU)",
                              "SimSampler": "Sampler (simulated GPU)"}
