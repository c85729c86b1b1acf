"""Probability-flow ODE sampling (EDM's Heun sampler) from σ_max or from a given level σ_start.

All functions take a *denoise function* ``denoise(params, x, sigma, labels) -> D(x; σ)`` (see
models/precond.py) and its ``params`` as arguments, so they jit with the parameters as inputs.
Grids are 1-D float arrays of decreasing σ ending in 0 (on the [-1, 1] image scale).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sfbd_jax.models.precond import DenoiseFn
from sfbd_jax.utils import devices


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for i < N, then σ_N = 0.

    Returns float64 array of shape (N + 1,).
    """
    if num_steps < 2:
        raise ValueError(f"the Karras grid needs at least 2 steps, got {num_steps}")
    i = np.arange(num_steps, dtype=np.float64)
    s = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho)
                                                          - sigma_max ** (1 / rho))) ** rho
    return np.concatenate([s, [0.0]])


def sigmas_from_level(sigma_start: float, num_steps: int, sigma_min: float = 0.002,
                      sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """The grid for denoising from level σ_start (SFBD backward step, METHODS.md §2a).

    The usual Karras grid of ``num_steps`` levels, truncated to the levels below σ_start, with
    σ_start inserted as the first level, then 0.
    """
    if not 0.0 < sigma_start <= sigma_max:
        raise ValueError(f"sigma_start must lie in (0, sigma_max={sigma_max}], got {sigma_start}")
    grid = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    below = grid[(grid < sigma_start) & (grid > 0)]
    return np.concatenate([[sigma_start], below, [0.0]])


def heun_sample(
    denoise: DenoiseFn,
    params: Any,
    x_start: jax.Array,
    sigmas: jax.Array,
    *,
    labels: jax.Array | None = None,
    key: jax.Array | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> jax.Array:
    """Integrate the probability-flow ODE dx/dσ = (x − D(x; σ))/σ along ``sigmas``.

    ``x_start``: (B, ...) at level sigmas[0] (e.g. σ_max·n, or a noisy image y at σ_ζ).
    Heun steps with the Euler step alone on the last (σ → 0) interval: 2(len−1) − 1 evaluations.
    With ``s_churn`` > 0 (needs ``key``), EDM's stochastic churn adds noise before each step for
    σ in [s_tmin, s_tmax].
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_intervals = sigmas.shape[0] - 1
    if s_churn > 0 and key is None:
        raise ValueError("stochastic sampling (s_churn > 0) needs a PRNG key")
    gamma_max = min(s_churn / num_intervals, np.sqrt(2.0) - 1.0) if s_churn > 0 else 0.0
    keys = (jax.random.split(key, num_intervals) if key is not None
            else jnp.zeros((num_intervals, 2), jnp.uint32))

    def d(x, sigma):
        return denoise(params, x, jnp.full((x.shape[0],), sigma), labels)

    def churn(x, t, k):
        if gamma_max == 0.0:
            return x, t
        gamma = jnp.where((t >= s_tmin) & (t <= s_tmax), gamma_max, 0.0)
        t_hat = t * (1.0 + gamma)
        eps = jax.random.normal(k, x.shape, x.dtype) * s_noise
        # √(t̂² − t²) written without the cancellation that can go negative in float32.
        return x + t * jnp.sqrt(gamma * (2.0 + gamma)) * eps, t_hat

    def heun_step(x, inputs):
        t_cur, t_next, k = inputs
        x_hat, t_hat = churn(x, t_cur, k)
        d_cur = (x_hat - d(x_hat, t_hat)) / t_hat
        x_euler = x_hat + (t_next - t_hat) * d_cur
        d_next = (x_euler - d(x_euler, t_next)) / t_next
        return x_hat + (t_next - t_hat) * 0.5 * (d_cur + d_next), None

    x = x_start.astype(jnp.float32)
    x, _ = jax.lax.scan(heun_step, x, (sigmas[:-2], sigmas[1:-1], keys[:-1]))
    # Last interval (σ_{N-1} → 0): Euler only.
    x_hat, t_hat = churn(x, sigmas[-2], keys[-1])
    return x_hat + (sigmas[-1] - t_hat) * (x_hat - d(x_hat, t_hat)) / t_hat


def make_sharded_sampler(denoise: DenoiseFn, mesh, sigmas, **churn_kwargs):
    """Jit ``heun_sample`` on ``sigmas`` with the batch sharded over ``mesh``'s ``data`` axis.

    Returns ``sample(params, x_start, labels, key) -> x0``; params are replicated, x_start
    (B, H, W, C) and labels (B,) are split along B (B must divide by the device count).
    """
    sigmas = np.asarray(sigmas, np.float32)
    batch = devices.batch_sharding(mesh)
    repl = devices.replicated(mesh)

    def sample(params, x_start, labels, key):
        return heun_sample(denoise, params, x_start, sigmas, labels=labels, key=key,
                           **churn_kwargs)

    return jax.jit(sample, in_shardings=(repl, batch, batch, repl), out_shardings=batch)


def num_evaluations(sigmas) -> int:
    """Denoiser evaluations that ``heun_sample`` spends on the grid ``sigmas``."""
    return 2 * (len(sigmas) - 1) - 1
