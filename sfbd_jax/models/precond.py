"""EDM preconditioning: the denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) (METHODS.md §1).

A *denoise function* throughout the package has the signature
``denoise(params, x, sigma, labels=None, *, train=False, rng=None) -> D``
with x: (B, H, W, C) on the [-1, 1] image scale plus noise, sigma: (B,) noise levels on that scale.
The sampler and the loss only see this function, so closed-form denoisers plug in for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DenoiseFn = Callable[..., jax.Array]


def edm_coefficients(sigma: jax.Array, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) for noise level(s) ``sigma`` (any shape)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    var = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / var
    c_out = sigma * sigma_data / jnp.sqrt(var)
    c_in = 1.0 / jnp.sqrt(var)
    c_noise = jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def make_denoiser(model: nn.Module, sigma_data: float) -> DenoiseFn:
    """Wrap a raw network F (a Flax module) into the EDM-preconditioned denoiser D."""

    def denoise(params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None,
                *, train: bool = False, rng: jax.Array | None = None,
                label_embedding_noise: jax.Array | None = None) -> jax.Array:
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sigma_data)
        expand = lambda c: c[:, None, None, None]
        rngs = {"dropout": rng} if (train and rng is not None) else None
        f = model.apply({"params": params}, expand(c_in) * x, c_noise, labels, train=train,
                        label_embedding_noise=label_embedding_noise, rngs=rngs)
        return expand(c_skip) * x + expand(c_out) * f.astype(jnp.float32)

    return denoise


def guided_denoiser(denoise: DenoiseFn, scale: float, null_label: int) -> DenoiseFn:
    """Classifier-free guidance: D_w = D(x; σ, ∅) + w·(D(x; σ, y) − D(x; σ, ∅)), ∅ = the null
    class ``null_label`` the model learned under label dropout. w = 1 is the conditional model
    itself (one evaluation), w = 0 the unconditional one; otherwise both in one batch of 2B."""
    if scale == 1.0:
        return denoise

    def guided(params: Any, x: jax.Array, sigma: jax.Array, labels: jax.Array | None = None,
               *, train: bool = False, rng: jax.Array | None = None,
               label_embedding_noise: jax.Array | None = None) -> jax.Array:
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels")
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        null = jnp.full_like(labels, null_label)
        if scale == 0.0:
            return denoise(params, x, sigma, null, train=train, rng=rng)
        both = denoise(params, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                       jnp.concatenate([labels, null]), train=train, rng=rng)
        cond, uncond = jnp.split(both, 2)
        return uncond + scale * (cond - uncond)

    return guided


def init_params(model: nn.Module, rng: jax.Array, image_shape: tuple[int, int, int],
                with_labels: bool) -> Any:
    """Initialise the network's parameters for images of ``image_shape`` = (H, W, C)."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if with_labels else None
    return model.init({"params": rng}, x, jnp.zeros((1,)), labels, train=False)["params"]
