"""Image grids: [-1, 1] float batches → uint8 tiles, written as PNG files."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(…, H, W, C) in [-1, 1] → uint8 0..255 (clipped)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8)


def make_grid(images: np.ndarray, columns: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile (N, H, W, C) images in [-1, 1] into one uint8 (rows·(H+p)+p, cols·(W+p)+p, C)."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c),
                    np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(grid: np.ndarray, path: str) -> None:
    """Write a uint8 (H, W, C) grid with C in {1, 3} to ``path`` (directories created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
