"""Denoising quality of a denoised set against the clean originals (SFBD diagnostics).

This module reads the evaluation-only originals; training code never imports it.
"""

from __future__ import annotations

import math

import numpy as np

from sfbd_jax.data import eval_only


def mse_psnr(estimate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean squared error per pixel and PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    if estimate.shape != reference.shape:
        raise ValueError(f"shapes differ: {estimate.shape} vs {reference.shape}")
    mse = float(np.mean((np.asarray(estimate, np.float64) - reference) ** 2))
    return mse, psnr_of_mse(mse)


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a per-pixel MSE for images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def against_originals(prepared_dir: str, images, rows_per_chunk: int = 4096,
                      which: np.ndarray | None = None, originals=None) -> dict[str, float]:
    """MSE/PSNR of ``images`` (in the order of the noisy set; clipped to [-1, 1] first)
    against the clean originals kept beside a prepared data set, and the fraction of pixel
    values of ``images`` outside [-1, 1] before that clipping (``clipped_fraction``).

    ``images``: an array or any row-indexable set (a memory-mapped ``ShardedArray``, a
    ``ConcatenatedRows``); both it and the originals are read ``rows_per_chunk`` rows at a
    time, so host memory does not grow with the set. ``which``: only these rows (indices into
    the noisy set, e.g. the denoised entries of online SFBD's buffer). ``originals``: those of
    ``prepared_dir`` already opened (``eval_only.load_clean_originals(lazy=True)``, which
    verifies their checksums), for a caller that measures repeatedly."""
    if originals is None:
        originals = eval_only.load_clean_originals(prepared_dir, lazy=True)
    if len(images) != len(originals) or tuple(images.shape[1:]) != tuple(originals.shape[1:]):
        raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(originals.shape)}")
    which = np.arange(len(images)) if which is None else np.asarray(which, np.int64)
    squared, outside, values = 0.0, 0, 0
    for start in range(0, len(which), rows_per_chunk):
        rows = which[start:start + rows_per_chunk]
        estimate = np.asarray(images[rows], np.float64)
        outside += int(np.count_nonzero(np.abs(estimate) > 1.0))
        squared += float(np.sum((np.clip(estimate, -1.0, 1.0) - originals[rows]) ** 2))
        values += estimate.size
    mse = squared / max(values, 1)
    return {"mse": mse, "psnr": psnr_of_mse(mse), "clipped_fraction": outside / max(values, 1)}
