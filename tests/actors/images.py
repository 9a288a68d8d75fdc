"""Image helpers the task tests share (img2img, inpainting, the inpaint area, the VAE-encode pins)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from renderfarm.planning.catalog import default_catalog

SIZE = 64


def entry(name: str):
    return default_catalog().get(name)


def png(array: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def noise_image(seed: int, width: int = SIZE, height: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
