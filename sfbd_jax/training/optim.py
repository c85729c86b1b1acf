"""Optimiser: optax Adam with EDM's linear learning-rate warm-up, EDM2's optional
inverse-square-root decay and gradient clipping, and the non-finite-gradient guard EDM applies
before every update."""

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


def lr_schedule(optim_config, batch_size: int) -> optax.Schedule:
    """The learning rate of the 0-based step: the warm-up times, when ``decay_images`` > 0,
    EDM2's inverse-square-root decay 1/sqrt(max(images_after_step / decay_images, 1)).

    The decay depends only on the images seen, not on the run's total budget, so a run's
    checkpoint after n images is the model a run of budget n ends with (as with the constant
    rate of ``decay_images`` = 0, EDM's).
    """
    warmup = warmup_schedule(optim_config.lr, optim_config.warmup_images, batch_size)
    if optim_config.decay_images <= 0:
        return warmup
    decay_steps = optim_config.decay_images / batch_size

    def schedule(step):
        images_ratio = (jnp.asarray(step, jnp.float32) + 1.0) / decay_steps
        return warmup(step) * jax.lax.rsqrt(jnp.maximum(images_ratio, 1.0))

    return schedule


def make_optimizer(optim_config, batch_size: int) -> optax.GradientTransformation:
    """Adam (β1, β2, ε from config) with ``lr_schedule``; global-norm clipping when
    grad_clip > 0."""
    schedule = lr_schedule(optim_config, batch_size)
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
