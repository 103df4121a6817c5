"""A plugin node that reads a model file the way ComfyUI nodes do (``folder_paths``)."""

import hashlib

import folder_paths


class ReadModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "read"
    OUTPUT_NODE = True
    CATEGORY = "test"

    def read(self, ckpt_name):
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return {"ui": {"text": [digest.hexdigest()]}, "result": (digest.hexdigest(),)}


NODE_CLASS_MAPPINGS = {"ReadModel": ReadModel}
