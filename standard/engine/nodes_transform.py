"""Geometry and batch nodes: scale, crop, pad, rotate, flip, invert, batch, size."""

from __future__ import annotations

from typing import Any

import numpy as np

from .compat import MAX_RESOLUTION
from .images import UPSCALE_METHODS, match_size, resize
from .node_class import NodeClasses

IMAGE_IN = {"image": ("IMAGE",)}


class ImageScale:
    crop_methods = ["disabled", "center"]

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (cls.crop_methods,),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image: np.ndarray, upscale_method: str, width: int, height: int, crop: str) -> tuple[np.ndarray]:
        if width == 0 and height == 0:
            return (image,)
        if width == 0:
            width = max(1, round(image.shape[2] * height / image.shape[1]))
        elif height == 0:
            height = max(1, round(image.shape[1] * width / image.shape[2]))
        return (resize(image, width, height, upscale_method, crop),)


class ImageScaleBy:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"

    def upscale(self, image: np.ndarray, upscale_method: str, scale_by: float) -> tuple[np.ndarray]:
        width = max(1, round(image.shape[2] * scale_by))
        height = max(1, round(image.shape[1] * scale_by))
        return (resize(image, width, height, upscale_method),)


class ImageInvert:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": dict(IMAGE_IN)}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"
    CATEGORY = "image"

    def invert(self, image: np.ndarray) -> tuple[np.ndarray]:
        return (1.0 - image,)


class ImageBatch:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "batch"
    CATEGORY = "image"

    def batch(self, image1: np.ndarray, image2: np.ndarray) -> tuple[np.ndarray]:
        return (np.concatenate([image1, match_size(image1, image2)], axis=0),)


class ImagePadForOutpaint:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        side = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8})
        return {"required": {
            "image": ("IMAGE",), "left": side, "top": side, "right": side, "bottom": side,
            "feathering": ("INT", {"default": 40, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
        }}

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "expand_image"
    CATEGORY = "image"

    def expand_image(self, image: np.ndarray, left: int, top: int, right: int, bottom: int,
                     feathering: int) -> tuple[np.ndarray, np.ndarray]:
        batch, height, width, channels = image.shape
        new_image = np.full((batch, height + top + bottom, width + left + right, channels), 0.5, np.float32)
        new_image[:, top:top + height, left:left + width, :] = image
        mask = np.ones((height + top + bottom, width + left + right), np.float32)
        inner = np.zeros((height, width), np.float32)
        if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
            rows = np.arange(height)[:, None]
            cols = np.arange(width)[None, :]
            distance = np.minimum.reduce([
                np.broadcast_to(rows if top else height, (height, width)),
                np.broadcast_to(height - rows if bottom else height, (height, width)),
                np.broadcast_to(cols if left else width, (height, width)),
                np.broadcast_to(width - cols if right else width, (height, width)),
            ])
            fade = np.clip((feathering - distance) / feathering, 0.0, None)
            inner = np.where(distance < feathering, fade * fade, 0.0).astype(np.float32)
        mask[top:top + height, left:left + width] = inner
        return new_image, mask[None, ...]


class ImageCrop:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        size = ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1})
        offset = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1})
        return {"required": {"image": ("IMAGE",), "width": size, "height": size, "x": offset, "y": offset}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "crop"
    CATEGORY = "image/transform"

    def crop(self, image: np.ndarray, width: int, height: int, x: int, y: int) -> tuple[np.ndarray]:
        x = min(x, image.shape[2] - 1)
        y = min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :].copy(),)


class ImageRotate:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": ("IMAGE",),
                             "rotation": (["none", "90 degrees", "180 degrees", "270 degrees"],)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "rotate"
    CATEGORY = "image/transform"

    def rotate(self, image: np.ndarray, rotation: str) -> tuple[np.ndarray]:
        turns = {"90": 1, "180": 2, "270": 3}.get(rotation.split(" ")[0], 0)
        return (np.ascontiguousarray(np.rot90(image, k=turns, axes=(2, 1))),)  # clockwise, as ComfyUI


class ImageFlip:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": ("IMAGE",),
                             "flip_method": (["x-axis: vertically", "y-axis: horizontally"],)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "flip"
    CATEGORY = "image/transform"

    def flip(self, image: np.ndarray, flip_method: str) -> tuple[np.ndarray]:
        axis = 1 if flip_method.startswith("x") else 2
        return (np.ascontiguousarray(np.flip(image, axis=axis)),)


class RepeatImageBatch:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": ("IMAGE",),
                             "amount": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "repeat"
    CATEGORY = "image/batch"

    def repeat(self, image: np.ndarray, amount: int) -> tuple[np.ndarray]:
        return (np.tile(image, (amount, 1, 1, 1)),)


class GetImageSize:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"image": ("IMAGE",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("INT", "INT", "INT")
    RETURN_NAMES = ("width", "height", "batch_size")
    FUNCTION = "get_size"
    CATEGORY = "image"
    DESCRIPTION = "Returns the width, height and batch size of the image."

    def get_size(self, image: np.ndarray, unique_id: str | None = None) -> tuple[int, int, int]:
        return int(image.shape[2]), int(image.shape[1]), int(image.shape[0])


NODE_CLASS_MAPPINGS: NodeClasses = {
    "ImageScale": ImageScale, "ImageScaleBy": ImageScaleBy, "ImageInvert": ImageInvert,
    "ImageBatch": ImageBatch, "ImagePadForOutpaint": ImagePadForOutpaint, "ImageCrop": ImageCrop,
    "ImageRotate": ImageRotate, "ImageFlip": ImageFlip, "RepeatImageBatch": RepeatImageBatch,
    "GetImageSize": GetImageSize,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageScale": "Upscale Image", "ImageScaleBy": "Upscale Image By", "ImageInvert": "Invert Image",
    "ImageBatch": "Batch Images", "ImagePadForOutpaint": "Pad Image for Outpainting",
    "ImageCrop": "Image Crop", "RepeatImageBatch": "Repeat Image Batch", "GetImageSize": "Get Image Size",
}
