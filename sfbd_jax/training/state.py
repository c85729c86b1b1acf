"""The training state: a plain pytree, replicated over the mesh, checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-exactly.

    step: completed optimiser steps; images_seen: training images consumed (int64 would need
    x64, so int32 with the count in images: fine to 2^31 ≈ 2.1 G images); nonfinite_grads:
    gradient entries zeroed so far; rng: the base PRNG key (uint32[2]); each step uses
    fold_in(rng, step).
    """

    step: jax.Array
    images_seen: jax.Array
    nonfinite_grads: jax.Array
    params: Any
    ema_params: Any
    opt_state: optax.OptState
    rng: jax.Array


def create_train_state(params: Any, optimizer: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
    """A fresh state at step 0; the EMA starts as a copy of the parameters."""
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, images_seen=zero, nonfinite_grads=zero, params=params,
                      ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params), rng=rng)
