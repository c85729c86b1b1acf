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
    return mse, (10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf"))


def against_originals(prepared_dir: str, images: np.ndarray) -> dict[str, float]:
    """MSE/PSNR of ``images`` (in the order of the noisy set; clipped to [-1, 1] first)
    against the clean originals kept beside a prepared data set."""
    originals = eval_only.load_clean_originals(prepared_dir)
    mse, psnr = mse_psnr(np.clip(images, -1.0, 1.0), originals)
    return {"mse": mse, "psnr": psnr}
