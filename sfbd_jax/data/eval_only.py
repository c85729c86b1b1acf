"""EVALUATION ONLY: the clean originals of the synthetically corrupted images.

SFBD's diagnostics (denoising MSE/PSNR of D^(k)) compare against them. Training code must never
import this module; tests/test_prepare.py checks that nothing under sfbd_jax/training does.
"""

from __future__ import annotations

import numpy as np

from sfbd_jax.data import shards
from sfbd_jax.data.prepare import read_manifest


def load_clean_originals(directory: str, lazy: bool = False):
    """(N_noisy, H, W, C) float32 in [-1, 1], in the order of the noisy set; ``lazy``: a
    memory-mapped ``shards.ShardedArray`` (checksums verified on opening) instead of an
    in-memory copy."""
    manifest = read_manifest(directory)
    entries = manifest["shards"]["eval_only"]
    if not entries:
        return np.zeros((0, *manifest["image_shape"]), np.float32)
    if lazy:
        return shards.ShardedArray(directory, entries["originals"])
    return shards.read_images(directory, entries["originals"])
