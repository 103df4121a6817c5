"""Test plugin (ComfyUI convention): ``TestSleep`` takes a known time (interruptible).

The one sleep node of the tests and the benches: ``support.cluster.write_sleep_plugin`` and ``bench/cluster.py``
copy this file into ``DIR/custom_nodes``.
"""

import time

import comfy.model_management


class TestSleep:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 600.0, "step": 0.001})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sleep"
    CATEGORY = "testing"

    def sleep(self, image, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(min(0.005, max(end - time.monotonic(), 0)))
        return (image,)


NODE_CLASS_MAPPINGS = {"TestSleep": TestSleep}
