"""Small deterministic test images (no download): gradients, shapes and seeded noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: The example input the shipped workflows name (``LoadImage``); committed under workflows/.
EXAMPLE_IMAGE_NAME = "megasr_example_lr.png"


def make_test_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """An RGB image with colour gradients, a few flat shapes and mild noise; identical for a seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + y) / 7.0)], axis=-1)
    img[height // 4 : height // 2, width // 5 : width // 2] = (0.9, 0.2, 0.1)
    cy, cx, r = 0.65 * height, 0.7 * width, 0.2 * min(width, height)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = (0.1, 0.3, 0.85)
    img = img + rng.normal(0.0, 0.03, img.shape).astype(np.float32)
    return Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="RGB")


def write_test_image(path: str | Path, width: int = 96, height: int = 64, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_test_image(width, height, seed).save(path, format="PNG", optimize=False)
    return path


def load_image_array(path: str | Path) -> np.ndarray:
    """An image file as float32 [H, W, C] in 0..1."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
