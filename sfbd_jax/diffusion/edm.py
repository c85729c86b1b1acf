"""EDM training objective (METHODS.md §1): σ sampling, loss weighting and the denoising loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sfbd_jax.models.precond import DenoiseFn


def sample_sigma(key: jax.Array, batch: int, p_mean: float, p_std: float) -> jax.Array:
    """Training noise levels σ = exp(P_mean + P_std·ξ), ξ ~ N(0, 1); shape (batch,)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch,)))


def loss_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
    """λ(σ) = (σ² + σ_d²) / (σ·σ_d)²."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss_per_example(
    denoise: DenoiseFn,
    params: Any,
    images: jax.Array,
    key: jax.Array,
    *,
    sigma_data: float,
    p_mean: float,
    p_std: float,
    labels: jax.Array | None = None,
    train: bool = True,
) -> jax.Array:
    """λ(σ)·‖D(x + σn; σ) − x‖² summed over pixels, one value per example: (B,).

    ``images``: (B, H, W, C) in [-1, 1]. ``key`` drives σ, the noise n and dropout.
    """
    k_sigma, k_noise, k_dropout = jax.random.split(key, 3)
    sigma = sample_sigma(k_sigma, images.shape[0], p_mean, p_std)
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    noisy = images + sigma[:, None, None, None] * noise
    denoised = denoise(params, noisy, sigma, labels, train=train, rng=k_dropout)
    sq_err = jnp.sum((denoised - images) ** 2, axis=(1, 2, 3))
    return loss_weight(sigma, sigma_data) * sq_err


def ambient_loss_per_example(
    denoise: DenoiseFn,
    params: Any,
    images: jax.Array,
    sigma: jax.Array,
    sigma_n: jax.Array,
    key: jax.Array,
    *,
    sigma_data: float,
    labels: jax.Array | None = None,
    train: bool = True,
) -> jax.Array:
    """The ambient loss at given levels (METHODS.md §3.2), one value per example: (B,).

    ``images`` x_n: (B, H, W, C), clean (σ_n = 0) or carrying known Gaussian noise of std
    ``sigma_n`` (B,); ``sigma`` (B,) the diffusion levels, each > σ_n where σ_n > 0 (the
    eligibility rule guarantees it). x_σ = x_n + √(σ² − σ_n²)·n;
    x̂_n = (σ_n²/σ²)·x_σ + (1 − σ_n²/σ²)·D(x_σ; σ);
    loss = λ(σ)·σ⁴/(σ² − σ_n²)²·‖x̂_n − x_n‖². Its minimiser over D is the clean denoiser
    E[x | x_σ]; with σ_n = 0 it is the EDM loss at level σ. ``key`` drives n and dropout.
    """
    k_noise, k_dropout = jax.random.split(key)
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_n = jnp.asarray(sigma_n, jnp.float32)
    gap = jnp.maximum(sigma**2 - sigma_n**2, 1e-12)  # > 0 for every eligible example
    noise = jax.random.normal(k_noise, images.shape, images.dtype)
    expand = lambda v: v[:, None, None, None]  # noqa: E731
    noisy = images + expand(jnp.sqrt(gap)) * noise
    denoised = denoise(params, noisy, sigma, labels, train=train, rng=k_dropout)
    ratio = sigma_n**2 / sigma**2
    predicted = expand(ratio) * noisy + expand(1.0 - ratio) * denoised
    sq_err = jnp.sum((predicted - images) ** 2, axis=(1, 2, 3))
    return loss_weight(sigma, sigma_data) * sigma**4 / gap**2 * sq_err
