"""ComfyUI's image/postprocessing nodes on NumPy: blur, sharpen, blend, quantize."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .images import from_pil, gaussian_blur, match_size, to_pil
from .node_class import NodeClasses

BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]
DITHERS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]


class ImageBlur:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "image": ("IMAGE",),
            "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blur"
    CATEGORY = "image/postprocessing"

    def blur(self, image: np.ndarray, blur_radius: int, sigma: float) -> tuple[np.ndarray]:
        if blur_radius == 0:
            return (image,)
        return (np.clip(gaussian_blur(image, blur_radius, sigma), 0.0, 1.0),)


class ImageSharpen:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "image": ("IMAGE",),
            "sharpen_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sharpen"
    CATEGORY = "image/postprocessing"

    def sharpen(self, image: np.ndarray, sharpen_radius: int, sigma: float, alpha: float) -> tuple[np.ndarray]:
        if sharpen_radius == 0:
            return (image,)
        # ComfyUI's kernel is -10*alpha*gaussian with the center raised so it sums to 1,
        # i.e. (1 + 10 alpha) * image - 10 alpha * blur(image).
        strength = alpha * 10.0
        sharpened = (1.0 + strength) * image - strength * gaussian_blur(image, sharpen_radius, sigma)
        return (np.clip(sharpened, 0.0, 1.0).astype(np.float32),)


def _soft_light_curve(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.25, ((16 * x - 12) * x + 4) * x, np.sqrt(x))


def blend(image1: np.ndarray, image2: np.ndarray, mode: str) -> np.ndarray:
    if mode == "normal":
        return image2
    if mode == "multiply":
        return image1 * image2
    if mode == "screen":
        return 1 - (1 - image1) * (1 - image2)
    if mode == "overlay":
        return np.where(image1 <= 0.5, 2 * image1 * image2, 1 - 2 * (1 - image1) * (1 - image2))
    if mode == "soft_light":
        return np.where(image2 <= 0.5, image1 - (1 - 2 * image2) * image1 * (1 - image1),
                        image1 + (2 * image2 - 1) * (_soft_light_curve(image1) - image1))
    if mode == "difference":
        return image1 - image2
    raise ValueError(f"Unsupported blend mode: {mode}")


class ImageBlend:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "image1": ("IMAGE",), "image2": ("IMAGE",),
            "blend_factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
            "blend_mode": (BLEND_MODES,),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blend_images"
    CATEGORY = "image/postprocessing"

    def blend_images(self, image1: np.ndarray, image2: np.ndarray, blend_factor: float,
                     blend_mode: str) -> tuple[np.ndarray]:
        image2 = match_size(image1, image2, "bicubic")
        if image2.shape[0] not in (1, image1.shape[0]):
            raise ValueError(f"cannot blend a batch of {image2.shape[0]} onto a batch of {image1.shape[0]}")
        blended = blend(image1, image2, blend_mode)
        blended = image1 * (1 - blend_factor) + blended * blend_factor
        return (np.clip(blended, 0.0, 1.0).astype(np.float32),)


def _bayer_matrix(size: int) -> np.ndarray:
    matrix = np.zeros((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[4 * matrix, 4 * matrix + 2], [4 * matrix + 3, 4 * matrix + 1]])
    return matrix / (size * size)


class ImageQuantize:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "image": ("IMAGE",),
            "colors": ("INT", {"default": 256, "min": 1, "max": 256, "step": 1}),
            "dither": (DITHERS,),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "quantize"
    CATEGORY = "image/postprocessing"

    def quantize(self, image: np.ndarray, colors: int, dither: str = "floyd-steinberg") -> tuple[np.ndarray]:
        result = np.empty(image.shape[:3] + (3,), np.float32)
        for index, frame in enumerate(image[..., :3]):
            pil = to_pil(frame).convert("RGB")
            palette = pil.quantize(colors=colors)  # median cut palette, as ComfyUI
            if dither.startswith("bayer"):
                size = int(dither.split("-")[1])
                threshold = _bayer_matrix(size)
                height, width = frame.shape[:2]
                tiled = np.tile(threshold, (height // size + 1, width // size + 1))[:height, :width]
                spread = 1.0 / max(colors, 2)
                pil = to_pil(np.clip(frame + (tiled[..., None] - 0.5) * spread, 0, 1)).convert("RGB")
                quantized = pil.quantize(palette=palette, dither=Image.Dither.NONE)
            else:
                mode = Image.Dither.FLOYDSTEINBERG if dither == "floyd-steinberg" else Image.Dither.NONE
                quantized = pil.quantize(palette=palette, dither=mode)
            result[index] = from_pil(quantized)
        return (result,)


NODE_CLASS_MAPPINGS: NodeClasses = {
    "ImageBlur": ImageBlur, "ImageSharpen": ImageSharpen, "ImageBlend": ImageBlend, "ImageQuantize": ImageQuantize,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageBlur": "Image Blur", "ImageSharpen": "Image Sharpen", "ImageBlend": "Image Blend",
    "ImageQuantize": "Image Quantize",
}
