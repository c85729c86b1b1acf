"""Optimiser: optax Adam with EDM's linear learning-rate warm-up and gradient clipping, and the
non-finite-gradient guard EDM applies before every update."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def warmup_schedule(lr: float, warmup_images: float, batch_size: int) -> optax.Schedule:
    """lr·min(images_after_step / warmup_images, 1) as a function of the 0-based step.

    EDM ramps on images seen; counting the current step's batch avoids a wasted lr = 0 step.
    """
    if warmup_images <= 0:
        return optax.constant_schedule(lr)
    steps = warmup_images / batch_size
    return lambda step: lr * jnp.minimum((jnp.asarray(step, jnp.float32) + 1.0) / steps, 1.0)


def make_optimizer(optim_config, batch_size: int) -> optax.GradientTransformation:
    """Adam (β1, β2, ε from config) with warm-up; global-norm clipping when grad_clip > 0."""
    schedule = warmup_schedule(optim_config.lr, optim_config.warmup_images, batch_size)
    parts = []
    if optim_config.grad_clip and optim_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
    parts.append(optax.adam(schedule, b1=optim_config.beta1, b2=optim_config.beta2,
                            eps=optim_config.eps))
    return optax.chain(*parts)


def zero_nonfinite(grads: Any) -> tuple[Any, jax.Array]:
    """Replace NaN/±inf gradient entries by 0 (EDM zeroes them before the step); also return how
    many entries were replaced. (optax.zero_nans handles NaN only, not inf.)"""
    leaves = jax.tree.leaves(grads)
    count = sum(jnp.sum(~jnp.isfinite(g)) for g in leaves) if leaves else jnp.zeros((), jnp.int32)
    clean = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grads)
    return clean, count.astype(jnp.int32)
