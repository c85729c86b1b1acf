"""The Heun sampler against the closed-form denoiser of Gaussian data N(μ, s²I):
D*(x; σ) = μ + s²/(s²+σ²)(x − μ)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfbd_jax.diffusion import sampler
from sfbd_jax.utils import devices

MU, S = 0.3, 0.5


def gaussian_denoiser(params, x, sigma, labels=None):
    mu, s = params
    sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
    return mu + s**2 / (s**2 + sigma**2) * (x - mu)


PARAMS = (jnp.float32(MU), jnp.float32(S))


def test_sampling_from_sigma_max_gives_the_data_distribution():
    # N = 40 levels: Heun's discretisation error on this Gaussian is 1% in std at N = 40 (and
    # 5.5% at N = 18; see test_heun_error_shrinks_at_second_order).
    sigmas = sampler.karras_sigmas(40)
    x_t = jax.random.normal(jax.random.PRNGKey(0), (16384, 16)) * sigmas[0]
    x0 = jax.jit(lambda x: sampler.heun_sample(gaussian_denoiser, PARAMS, x, sigmas))(x_t)
    x0 = np.asarray(x0)
    assert abs(x0.mean() - MU) < 0.02 * MU
    assert abs(x0.std() - S) < 0.02 * S


def test_backward_step_from_sigma_zeta_removes_the_noise():
    sigma_zeta = 0.2
    sigmas = sampler.sigmas_from_level(sigma_zeta, 40)
    y = MU + np.sqrt(S**2 + sigma_zeta**2) * jax.random.normal(jax.random.PRNGKey(1),
                                                                 (16384, 16))
    x0 = np.asarray(jax.jit(
        lambda y: sampler.heun_sample(gaussian_denoiser, PARAMS, y, sigmas))(y))
    assert abs(x0.mean() - MU) < 0.02 * MU
    assert abs(x0.std() - S) < 0.02 * S
    # The exact ODE flow maps y to μ + s/√(s²+σ_ζ²)(y − μ): check every sample.
    exact = MU + S / np.sqrt(S**2 + sigma_zeta**2) * (np.asarray(y) - MU)
    np.testing.assert_allclose(x0, exact, atol=2e-3)


def test_heun_error_shrinks_at_second_order():
    exact = S * 80.0 / np.sqrt(S**2 + 80.0**2)  # the exact ODE flow maps σ_max·n to s·n
    errors = []
    for n in (18, 40, 100):
        x0 = sampler.heun_sample(gaussian_denoiser, (0.0, S), jnp.full((1, 1), 80.0),
                                 sampler.karras_sigmas(n))
        errors.append(abs(float(x0[0, 0]) / 80.0 - exact / 80.0) / (exact / 80.0))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-3
    # Halving the step (N → 2.2 N) cuts the error about (2.2)² ≈ 5×, as for a 2nd-order method.
    assert errors[0] / errors[1] > 4.0


def test_stochastic_churn_keeps_the_distribution():
    # Churn adds discretisation error (2.7% in std at N = 40 here), so use a finer grid.
    sigmas = sampler.karras_sigmas(100)
    x_t = jax.random.normal(jax.random.PRNGKey(2), (16384, 16)) * sigmas[0]
    x0 = np.asarray(jax.jit(lambda x, k: sampler.heun_sample(
        gaussian_denoiser, PARAMS, x, sigmas, key=k, s_churn=10.0, s_tmin=0.05,
        s_tmax=50.0))(x_t, jax.random.PRNGKey(3)))
    assert abs(x0.mean() - MU) < 0.02 * MU
    assert abs(x0.std() - S) < 0.02 * S


def test_number_of_denoiser_evaluations_is_2n_minus_1():
    calls = []

    def counting(params, x, sigma, labels=None):
        calls.append(1)
        return gaussian_denoiser(params, x, sigma)

    sigmas = sampler.karras_sigmas(18)
    with jax.disable_jit():
        sampler.heun_sample(counting, PARAMS, jnp.zeros((2, 3)) + 80.0, sigmas)
    assert len(calls) == 35 == sampler.num_evaluations(sigmas)


def test_sharded_sampler_matches_single_device(two_devices):
    sigmas = sampler.sigmas_from_level(0.2, 40)
    y = jax.random.normal(jax.random.PRNGKey(4), (8, 4, 4, 1))
    outs = []
    for n in (1, 2):
        mesh = devices.make_data_mesh(n)
        fn = sampler.make_sharded_sampler(gaussian_denoiser, mesh, sigmas)
        outs.append(np.asarray(fn(PARAMS, y, None, jax.random.PRNGKey(0))))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_churn_without_key_is_an_error():
    with pytest.raises(ValueError, match="PRNG key"):
        sampler.heun_sample(gaussian_denoiser, PARAMS, jnp.zeros((2, 2)),
                            sampler.karras_sigmas(4), s_churn=1.0)
