"""Test plugin: a node that reports progress with a preview, via ComfyUI's own modules."""
import comfy.model_management
import comfy.utils
import folder_paths
from PIL import Image


class TestProgress:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "steps": ("INT", {"default": 3, "min": 1, "max": 100})}}

    RETURN_TYPES = ("IMAGE", "STRING")
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, image, steps):
        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(bar.current + 1, steps, ("PNG", Image.new("RGB", (4, 4), "red"), 512))
        return (image, folder_paths.get_output_directory())


class TestFail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "message": ("STRING", {"default": "boom"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "fail"
    CATEGORY = "testing"

    def fail(self, image, message):
        raise ValueError(message)


class TestSplit:
    """OUTPUT_IS_LIST: one image per batch entry; the next node runs once per item."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "split"
    CATEGORY = "testing"

    def split(self, image):
        return ([image[i:i + 1] for i in range(image.shape[0])],)


class TestCount:
    """Counts its executions in a file, to observe caching; IS_CHANGED follows a 'salt' file."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "count"
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        import os
        salt = os.path.join(folder_paths.get_input_directory(), "salt.txt")
        return open(salt).read() if os.path.exists(salt) else ""

    def count(self, image):
        import os
        path = os.path.join(folder_paths.get_input_directory(), "count.txt")
        n = int(open(path).read()) if os.path.exists(path) else 0
        with open(path, "w") as handle:
            handle.write(str(n + 1))
        return (image,)


NODE_CLASS_MAPPINGS = {"TestProgress": TestProgress, "TestFail": TestFail, "TestSplit": TestSplit,
                       "TestCount": TestCount}
NODE_DISPLAY_NAME_MAPPINGS = {"TestProgress": "Test Progress"}
