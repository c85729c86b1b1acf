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


DPS_GUIDANCE = ("normalized", "likelihood")


def dps_sample(
    denoise: DenoiseFn,
    params: Any,
    y: jax.Array,
    sigmas: jax.Array,
    zeta: float,
    *,
    key: jax.Array,
    labels: jax.Array | None = None,
    guidance: str = "normalized",
    noise_sigma: float = 0.0,
    prior_sigma: float = 0.0,
) -> jax.Array:
    """Diffusion posterior sampling (DPS, Chung et al. 2023) of x given y = x + σ_ζ·ε.

    Starts from x = σ_0·n (n ~ N(0, I), σ_0 = sigmas[0], normally σ_max) and walks the grid
    ``sigmas`` (decreasing, ending in 0) with ancestral steps of the variance-exploding process,
    each followed by a guidance step towards y. At level t → s, with x̂₀ = D(x; t):
        x' = x̂₀ + (s²/t²)(x − x̂₀) + s·√(1 − s²/t²)·n        (q(x_s | x_t, x₀ = x̂₀): DDPM's
                                                               ancestral step written for σ)
        'normalized':  x ← x' − ζ·∇ₓ‖y − D(x; t)‖
        'likelihood':  x ← x' − ζ·(t² − s²)·∇ₓ‖y − D(x; t)‖² / (2v),  v = noise_sigma²
                       (+ prior_sigma²·t²/(prior_sigma² + t²) when prior_sigma > 0)
    The gradients go through D. 'normalized' (∇‖r‖ = Jᵀr/‖r‖) is the step of the DPS paper
    and of the EMDiffusion code (which takes one norm over the whole batch; here each example
    has its own, so a sample does not depend on its batch); its ζ is per step, so the total
    pull towards y grows with the number of levels. 'likelihood' is the score of DPS's
    Gaussian likelihood N(y; D(x; t), v) times the ancestral step's variance t² − s² (ζ = 1:
    Bayes' rule under that likelihood); with prior_sigma the variance also carries the
    posterior variance of x₀ given x_t under a Gaussian prior of that std, which makes the
    sampler exact for Gaussian data as the grid is refined (tests/test_dps.py).
    y: (B, ...) on the [-1, 1] scale; returns (B, ...). Costs len(sigmas) − 1 evaluations of D,
    each with its gradient (``num_dps_evaluations``).
    """
    _check_guidance(guidance, noise_sigma)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    x, keys = _dps_start(y, key, sigmas[0], sigmas.shape[0] - 1)

    def step(x, inputs):
        t, s, k = inputs
        return _dps_step(denoise, params, x, y, t, s, k, labels, zeta, guidance, noise_sigma,
                         prior_sigma), None

    x, _ = jax.lax.scan(step, x, (sigmas[:-1], sigmas[1:], keys))
    return x


def _check_guidance(guidance: str, noise_sigma: float) -> None:
    if guidance not in DPS_GUIDANCE:
        raise ValueError(f"unknown DPS guidance {guidance!r}; known: {DPS_GUIDANCE}")
    if guidance == "likelihood" and noise_sigma <= 0:
        raise ValueError("'likelihood' DPS guidance needs the noise level noise_sigma > 0")


def _dps_start(y: jax.Array, key: jax.Array, sigma_start, num_intervals: int):
    """(x = σ_0·n of y's shape, the keys of the ``num_intervals`` ancestral steps)."""
    start_key, step_key = jax.random.split(key)
    x = jax.random.normal(start_key, y.shape, jnp.float32) * sigma_start
    return x, jax.random.split(step_key, num_intervals)


def _dps_step(denoise, params, x, y, t, s, key, labels, zeta, guidance, noise_sigma,
              prior_sigma):
    """One DPS level t → s (``dps_sample``'s formulas)."""
    y = y.astype(jnp.float32)
    batch_axes = tuple(range(1, y.ndim))

    def misfit(x):
        """Σ_b of each example's misfit (so its gradient is each example's own); D(x; t)."""
        d = denoise(params, x, jnp.full((x.shape[0],), t), labels)
        squared = jnp.sum(jnp.square(y - d), axis=batch_axes)
        if guidance == "normalized":  # the floor keeps ∇‖r‖ finite where r vanishes
            return jnp.sum(jnp.sqrt(jnp.maximum(squared, 1e-20))), d
        variance = noise_sigma**2
        if prior_sigma > 0:
            variance = variance + prior_sigma**2 * t**2 / (prior_sigma**2 + t**2)
        return jnp.sum(squared) / (2.0 * variance), d

    grad, d = jax.grad(misfit, has_aux=True)(x)
    ratio = jnp.square(s / t)
    noise = jax.random.normal(key, x.shape, x.dtype)
    x_next = d + ratio * (x - d) + s * jnp.sqrt(jnp.maximum(1.0 - ratio, 0.0)) * noise
    scale = zeta if guidance == "normalized" else zeta * (t**2 - s**2)
    return x_next - scale * grad


def make_sharded_dps_sampler(denoise: DenoiseFn, mesh, sigmas, zeta: float, *,
                             guidance: str = "normalized", noise_sigma: float = 0.0,
                             prior_sigma: float = 0.0):
    """``dps_sample`` on ``sigmas`` with the batch sharded over ``mesh``'s ``data`` axis, one
    jitted call per level (the same numbers as ``dps_sample``).

    Returns ``sample(params, y, labels, key) -> x0``, the signature of
    ``make_sharded_sampler``'s function with the observations y in place of x_start. Levels
    are dispatched from Python rather than scanned: XLA:CPU runs a gradient through the
    network inside a while loop several times slower than the same step compiled alone
    (RESULTS.md, EMDiffusion), and one compiled step serves every level.
    """
    _check_guidance(guidance, noise_sigma)
    sigmas = np.asarray(sigmas, np.float32)
    batch = devices.batch_sharding(mesh)
    repl = devices.replicated(mesh)
    start = jax.jit(lambda y, key: _dps_start(y, key, sigmas[0], len(sigmas) - 1),
                    in_shardings=(batch, repl), out_shardings=(batch, repl))
    step = jax.jit(
        lambda params, x, y, labels, t, s, key: _dps_step(
            denoise, params, x, y, t, s, key, labels, zeta, guidance, noise_sigma,
            prior_sigma),
        in_shardings=(repl, batch, batch, batch, repl, repl, repl), out_shardings=batch,
        donate_argnums=1)

    def sample(params, y, labels, key):
        x, keys = start(y, key)
        for i in range(len(sigmas) - 1):
            x = step(params, x, y, labels, sigmas[i], sigmas[i + 1], keys[i])
        return x

    return sample


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


def num_dps_evaluations(sigmas) -> int:
    """Denoiser evaluations (each with its gradient) that ``dps_sample`` spends on ``sigmas``."""
    return len(sigmas) - 1
