"""Which input files are images (``LoadImage``'s list: the engine's, and the bucket's names a front of real
ComfyUI adds). Which values name a model file is ``standard.model_files``.

Kept free of oss2 imports: the engine's folder lists import it without a bucket.
"""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(name: str) -> bool:
    """An input file ``LoadImage`` lists."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
