"""The jitted, data-parallel EDM train step.

The global batch is sharded along the mesh axis ``data``; the state is replicated and its
buffers are donated. ``steps_per_dispatch`` > 1 runs several steps per call with ``lax.scan``
over a stack of batches of shape (steps, batch, H, W, C).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sfbd_jax.diffusion import edm
from sfbd_jax.models.precond import DenoiseFn
from sfbd_jax.training import ema as ema_lib
from sfbd_jax.training.optim import zero_nonfinite
from sfbd_jax.training.state import TrainState
from sfbd_jax.utils import devices

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], jax.Array]


def condition_transform(model_config, cep_config):
    """``(labels, key) -> (labels, δ or None)`` for training batches of a conditional model:
    label dropout (labels → the null class ``num_classes`` with probability
    ``model.label_dropout``, for classifier-free guidance) and CEP's embedding perturbation δ
    (B, d), d = the label embedding width (model.base_channels): U(−γ/√d, γ/√d) for
    ``cep.kind='uniform'`` (CEP-U), N(0, (γ/√d)²) for 'gaussian' (CEP-G), fresh per example.
    Training only: the sampler never sees δ."""
    p_drop = float(model_config.label_dropout)
    kind, gamma = cep_config.kind, float(cep_config.gamma)
    d = int(model_config.base_channels)
    scale = gamma / d**0.5

    def transform(labels, key):
        k_drop, k_cep = jax.random.split(key)
        if p_drop > 0:
            drop = jax.random.uniform(k_drop, labels.shape) < p_drop
            labels = jnp.where(drop, model_config.num_classes, labels)
        delta = None
        if kind == "uniform":
            delta = jax.random.uniform(k_cep, (labels.shape[0], d), minval=-scale, maxval=scale)
        elif kind == "gaussian":
            delta = scale * jax.random.normal(k_cep, (labels.shape[0], d))
        return labels, delta

    return transform


def edm_loss_fn(denoise: DenoiseFn, diffusion_config, condition=None) -> LossFn:
    """loss(params, batch, key) -> mean loss over the batch.

    A batch with ``sigma`` (B,) (Ambient-Omni: levels drawn with the examples, see
    data/eligibility.py) gets the ambient loss at those levels, with the examples' known noise
    levels ``sigma_n`` (B,) when present (0 otherwise); a batch of images only gets the EDM loss
    with σ drawn here. ``condition`` (see ``condition_transform``) applies label dropout and
    CEP to the batch's labels first.
    """

    def loss(params, batch, key):
        if condition is not None and "label" in batch:
            key, k_cond = jax.random.split(key)
            labels, delta = condition(batch["label"], k_cond)
            batch = {**batch, "label": labels}
            if delta is not None:
                denoise_fn = lambda *a, **k: denoise(*a, label_embedding_noise=delta, **k)  # noqa: E731
                return _loss(denoise_fn, params, batch, key)
        return _loss(denoise, params, batch, key)

    def _loss(denoise, params, batch, key):
        if "sigma" in batch:
            sigma = batch["sigma"]
            per_example = edm.ambient_loss_per_example(
                denoise, params, batch["image"], sigma,
                batch.get("sigma_n", jnp.zeros_like(sigma)), key,
                sigma_data=diffusion_config.sigma_data, labels=batch.get("label"), train=True)
            return jnp.mean(per_example)
        per_example = edm.edm_loss_per_example(
            denoise, params, batch["image"], key, sigma_data=diffusion_config.sigma_data,
            p_mean=diffusion_config.p_mean, p_std=diffusion_config.p_std,
            labels=batch.get("label"), train=True)
        return jnp.mean(per_example)

    return loss


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, ema_config) -> tuple[TrainState, dict]:
    """One optimiser step on ``batch``; returns the new state and scalar metrics."""
    batch_size = batch["image"].shape[0]
    key = jax.random.fold_in(state.rng, state.step)
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key)
    grads, nonfinite = zero_nonfinite(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_lib.ema_decay(state.images_seen, batch_size, ema_config.halflife_images,
                              ema_config.rampup_ratio)
    new_state = state.replace(
        step=state.step + 1,
        images_seen=state.images_seen + batch_size,
        nonfinite_grads=state.nonfinite_grads + nonfinite,
        params=params,
        ema_params=ema_lib.ema_update(state.ema_params, params, decay),
        opt_state=opt_state,
    )
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "nonfinite_grads": nonfinite, "ema_decay": decay}
    return new_state, metrics


def _first_true(mask: jax.Array) -> jax.Array:
    """Index of the first True of a 1-D mask, −1 when there is none (int32)."""
    return jnp.where(mask.any(), jnp.argmax(mask), -1).astype(jnp.int32)


@jax.jit
def track_first_nonfinite(first: jax.Array, offsets: jax.Array, steps_before: jax.Array
                          ) -> jax.Array:
    """Fold a dispatch's ``first_nonfinite`` offsets into ``first`` (int32[2], the step numbers
    — counted as completed steps, so the k-th step is step k — of the first non-finite loss and
    gradient so far, −1 for none). Runs on device, so the training loop never waits on it."""
    found = offsets >= 0
    return jnp.where((first < 0) & found, steps_before + offsets + 1, first)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, ema_config,
                    mesh, unroll: bool = True
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Jit ``train_step`` scanned over a stack of batches (steps, B, ...).

    Returns ``step_fn(state, batches) -> (state, metrics)``; metrics are averaged over the
    stacked steps (``nonfinite_grads`` summed), and ``first_nonfinite`` (int32[2]) holds the
    position within the dispatch of the first step whose loss, resp. gradient, was non-finite
    (−1: none), so the host can name that step without reading every dispatch's metrics. The
    state argument is donated.
    ``unroll``: unroll the scan (config.train.unroll_dispatch). Needed on the CPU backend, where
    XLA runs convolution gradients inside a rolled loop about 40× slower; a rolled scan keeps
    compile times short on GPU/TPU for many steps per dispatch.
    """

    def body(s, b):
        return train_step(s, b, loss_fn=loss_fn, optimizer=optimizer, ema_config=ema_config)

    def multi_step(state, batches):
        if unroll:  # a Python loop: XLA sees straight-line code (lax.scan(unroll=True) does not
            # help on CPU: it still emits a loop).
            per_step = []
            for i in range(batches["image"].shape[0]):
                state, m = body(state, jax.tree.map(lambda x, i=i: x[i], batches))
                per_step.append(m)
            metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)
        else:
            state, metrics = jax.lax.scan(body, state, batches)
        per_step_grads = metrics.pop("nonfinite_grads")
        first = jnp.stack([_first_true(~jnp.isfinite(metrics["loss"])),
                           _first_true(per_step_grads > 0)])
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["nonfinite_grads"] = per_step_grads.sum()
        metrics["first_nonfinite"] = first
        return state, metrics

    repl = devices.replicated(mesh)
    return jax.jit(multi_step, in_shardings=(repl, devices.batch_sharding(mesh, 1)),
                   out_shardings=(repl, repl), donate_argnums=(0,))
