"""Nodes that make, load and save images: ComfyUI's class names, inputs and file naming."""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any

import numpy as np
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from . import save_names
from .compat import MAX_RESOLUTION, folder_paths
from .images import from_pil, to_pil

MASK_CHANNELS = ["alpha", "red", "green", "blue"]


class EmptyImage:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"
    CATEGORY = "image"

    def generate(self, width: int, height: int, batch_size: int = 1, color: int = 0) -> tuple[np.ndarray]:
        rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        image = np.empty((batch_size, height, width, 3), dtype=np.float32)
        image[...] = rgb
        return (image,)


def _input_image_choices() -> tuple[list[str], dict[str, Any]]:
    return (folder_paths.list_input_images(), {"image_upload": True})


def _file_hash(image: str) -> str:
    digest = hashlib.sha256()
    with open(folder_paths.get_annotated_filepath(image), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _validate_image_file(image: str) -> bool | str:
    if not folder_paths.exists_annotated_filepath(image):
        return f"Invalid image file: {image}"
    return True


class LoadImage:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": _input_image_choices()}}

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    def load_image(self, image: str) -> tuple[np.ndarray, np.ndarray]:
        path = folder_paths.get_annotated_filepath(image)
        frames, masks = [], []
        with Image.open(path) as opened:
            for frame in ImageSequence.Iterator(opened):
                frame = ImageOps.exif_transpose(frame)
                rgb = from_pil(frame)
                if frames and rgb.shape != frames[0].shape:
                    continue  # ComfyUI keeps only frames of the first frame's size
                frames.append(rgb)
                if "A" in frame.getbands():
                    masks.append(1.0 - np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0)
                else:
                    masks.append(np.zeros((64, 64), dtype=np.float32))
                if opened.format == "MPO":
                    break
        return np.stack(frames), np.stack(masks)

    @classmethod
    def IS_CHANGED(cls, image: str) -> str:
        return _file_hash(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        return _validate_image_file(image)


class LoadImageMask:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": _input_image_choices(), "channel": (MASK_CHANNELS,)}}

    CATEGORY = "mask"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"

    def load_image(self, image: str, channel: str) -> tuple[np.ndarray]:
        path = folder_paths.get_annotated_filepath(image)
        with Image.open(path) as opened:
            frame = ImageOps.exif_transpose(opened)
            if frame.getbands() != ("R", "G", "B", "A"):
                if frame.mode == "I":
                    frame = frame.point(lambda i: i * (1 / 255))
                frame = frame.convert("RGBA")
            band = channel[0].upper()
            if band in frame.getbands():
                mask = np.asarray(frame.getchannel(band), dtype=np.float32) / 255.0
                if band == "A":
                    mask = 1.0 - mask
            else:
                mask = np.zeros((64, 64), dtype=np.float32)
        return (mask[None, ...],)

    @classmethod
    def IS_CHANGED(cls, image: str, channel: str) -> str:
        return _file_hash(image)

    @classmethod
    def VALIDATE_INPUTS(cls, image: str) -> bool | str:
        return _validate_image_file(image)


class SaveImage:
    """Writes ``{prefix}_{counter:05}_.png`` with the prompt in the PNG text, as ComfyUI does."""

    type = "output"
    prefix_append = ""
    compress_level = 4

    def directory(self) -> str:
        return folder_paths.get_output_directory()

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": (
                    "The prefix for the file to save. This may include formatting information "
                    "such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.")}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def save_images(self, images: np.ndarray, filename_prefix: str = "ComfyUI", prompt: Any = None,
                    extra_pnginfo: dict[str, Any] | None = None) -> dict[str, Any]:
        filename_prefix += self.prefix_append
        folder, filename, subfolder, _ = folder_paths.save_location(
            filename_prefix, self.directory(), images.shape[2], images.shape[1])
        counter = save_names.next_counter(folder, filename)
        results = []
        for batch_number, image in enumerate(images):
            metadata = PngInfo()
            if prompt is not None:
                metadata.add_text("prompt", json.dumps(prompt))
            for key, value in (extra_pnginfo or {}).items():
                metadata.add_text(key, json.dumps(value))
            name, counter = save_names.claim(folder, filename.replace("%batch_num%", str(batch_number)), counter,
                                             counted_as=filename)
            to_pil(image).save(os.path.join(folder, name), pnginfo=metadata, compress_level=self.compress_level)
            results.append({"filename": name, "subfolder": subfolder, "type": self.type})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    """SaveImage into the temp folder under a random ``ComfyUI_temp_xxxxx_`` prefix."""

    type = "temp"
    compress_level = 1

    def __init__(self) -> None:
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))

    def directory(self) -> str:
        return folder_paths.get_temp_directory()

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"images": ("IMAGE",)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    DESCRIPTION = "Saves the input images to the temp directory for preview."


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "EmptyImage": EmptyImage, "LoadImage": LoadImage, "LoadImageMask": LoadImageMask,
    "SaveImage": SaveImage, "PreviewImage": PreviewImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadImage": "Load Image", "LoadImageMask": "Load Image (as Mask)",
    "SaveImage": "Save Image", "PreviewImage": "Preview Image",
}
