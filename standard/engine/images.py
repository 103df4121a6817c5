"""NumPy image helpers for the node set: ComfyUI's IMAGE layout is float32
[batch, height, width, channels] in 0..1 and MASK is [batch, height, width]."""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLE = {
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "area": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
UPSCALE_METHODS = list(RESAMPLE)


def to_pil(image: np.ndarray) -> Image.Image:
    """One [H, W, C] float image -> 8-bit PIL image (RGB, RGBA or L)."""
    array = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)


def from_pil(image: Image.Image) -> np.ndarray:
    """A PIL image -> [H, W, C] float32 in 0..1 (16-bit 'I' images scaled as ComfyUI does)."""
    if image.mode == "I":
        image = image.point(lambda i: i * (1 / 255))
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def resize(images: np.ndarray, width: int, height: int, method: str, crop: str = "disabled") -> np.ndarray:
    """ComfyUI's ``common_upscale`` for [B, H, W, C]: optional center crop to the new aspect, then resample."""
    _, old_h, old_w, _ = images.shape
    if crop == "center":
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        images = images[:, y:old_h - y, x:old_w - x, :]
    if images.shape[1:3] == (height, width):
        return images.copy()
    resample = RESAMPLE[method]
    out = np.empty((images.shape[0], height, width, images.shape[3]), dtype=np.float32)
    for b in range(images.shape[0]):
        for c in range(images.shape[3]):
            plane = Image.fromarray(np.ascontiguousarray(images[b, :, :, c], dtype=np.float32), mode="F")
            out[b, :, :, c] = np.asarray(plane.resize((width, height), resample), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def gaussian_blur(images: np.ndarray, radius: int, sigma: float) -> np.ndarray:
    """ComfyUI's ImageBlur kernel (size 2r+1 over linspace(-1, 1)), reflect-padded, as two 1-D passes."""
    size = radius * 2 + 1
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float64)
    g = np.exp(-(axis * axis) / (2.0 * sigma * sigma))
    g /= g.sum()
    padded = np.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    rows = sum(g[i] * padded[:, i:i + height, :, :] for i in range(size))
    return sum(g[j] * rows[:, :, j:j + width, :] for j in range(size)).astype(np.float32)


def match_size(reference: np.ndarray, other: np.ndarray, method: str = "bilinear") -> np.ndarray:
    """``other`` resized to ``reference``'s height and width (center crop), channels matched."""
    if other.shape[1:3] != reference.shape[1:3]:
        other = resize(other, reference.shape[2], reference.shape[1], method, "center")
    channels = reference.shape[3]
    if other.shape[3] < channels:
        other = np.concatenate([other, np.ones(other.shape[:3] + (channels - other.shape[3],), np.float32)], axis=3)
    return other[..., :channels]
