"""How images are stored on disk and read back: the one pixel codec of the project.

In memory, images are float32 (N, H, W, C) in [-1, 1]. On disk (prepared shards) clean
images are uint8 pixels (0..255, exact: every source image *is* uint8 / 127.5 − 1), and noisy
or denoised images, whose values are unclipped reals, float16 (or float32). ``decode`` turns
any stored rows into float32 per batch.
"""

from __future__ import annotations

import numpy as np

STORED_IMAGE_DTYPES = ("uint8", "float16", "float32")


def uint8_to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (0..255) → float32 in [-1, 1]."""
    return pixels.astype(np.float32) / 127.5 - 1.0


def exact_uint8(images: np.ndarray) -> np.ndarray | None:
    """``images`` (float, [-1, 1]) as uint8 pixels when ``uint8_to_unit_range`` gives them back
    bit for bit; None when some value is not such a pixel (e.g. synthetic real-valued data)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    with np.errstate(invalid="ignore"):
        if not np.all((images >= -1.0) & (images <= 1.0)):  # NaN included
            return None
        pixels = np.rint((images.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
    return pixels if np.array_equal(uint8_to_unit_range(pixels), images) else None


def decode(stored: np.ndarray) -> np.ndarray:
    """Stored image rows (uint8 pixels or float16/float32 values) → float32 (uint8 → [-1, 1])."""
    if stored.dtype == np.uint8:
        return uint8_to_unit_range(stored)
    if stored.dtype in (np.float16, np.float32):
        return np.asarray(stored, np.float32)
    raise TypeError(f"stored images must be one of {STORED_IMAGE_DTYPES}, got {stored.dtype}")
