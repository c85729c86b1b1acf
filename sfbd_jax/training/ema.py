"""EDM's exponential moving average of the parameters, with half-life in images and ramp-up."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax


def ema_decay(images_seen: jnp.ndarray, batch_size: int, halflife_images: float,
              rampup_ratio: float | None) -> jnp.ndarray:
    """β = 0.5^(batch / max(min(halflife, ramp·images_seen), 1e-8)).

    ``images_seen`` counts images *before* the current step (EDM's ``cur_nimg``), so the first
    update copies the parameters (β = 0). ``rampup_ratio`` None or 0 disables the ramp-up.
    """
    halflife = jnp.asarray(halflife_images, jnp.float32)
    if rampup_ratio:
        halflife = jnp.minimum(halflife, rampup_ratio * jnp.asarray(images_seen, jnp.float32))
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def ema_update(ema_params: Any, params: Any, decay: jnp.ndarray) -> Any:
    """ema ← β·ema + (1 − β)·params."""
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
