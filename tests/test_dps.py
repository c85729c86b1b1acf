"""Diffusion posterior sampling (EMDiffusion's E-step) against the closed form of Gaussian data
x ~ N(μ, s²I), y = x + σ_ζ·ε: the exact posterior is N(μ + k(y − μ), k·σ_ζ²), k = s²/(s²+σ_ζ²)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler import MU, PARAMS, S, gaussian_denoiser

from sfbd_jax.diffusion import sampler
from sfbd_jax.utils import devices

SIGMA_ZETA = 0.2
K = S**2 / (S**2 + SIGMA_ZETA**2)  # the posterior's regression slope on y
POSTERIOR_VAR = K * SIGMA_ZETA**2


def gaussian_observations(batch=8192, dim=16):
    x = MU + S * jax.random.normal(jax.random.PRNGKey(0), (batch, dim))
    return x + SIGMA_ZETA * jax.random.normal(jax.random.PRNGKey(1), (batch, dim))


def dps(y, num_steps, zeta, **kw):
    sigmas = sampler.karras_sigmas(num_steps)
    fn = jax.jit(lambda y: sampler.dps_sample(gaussian_denoiser, PARAMS, y, sigmas, zeta,
                                              key=jax.random.PRNGKey(2), **kw))
    return np.asarray(fn(y))


def posterior_fit(y, x):
    """(slope of x on y, variance of x around the exact posterior mean)."""
    y = np.asarray(y)
    slope = np.sum((x - MU) * (y - MU)) / np.sum((y - MU) ** 2)
    return slope, np.var(x - (MU + K * (y - MU)))


def test_without_guidance_it_samples_the_prior():
    # The ancestral step with the exact x̂₀ loses (1 − s²/t²)²·Var(x₀|x_t) per step: a
    # first-order error, 1.6% in std at 400 levels.
    x = dps(gaussian_observations(), 400, 0.0)
    assert abs(x.mean() - MU) < 0.01
    assert x.std() == pytest.approx(S, rel=0.025)


def test_likelihood_guidance_with_the_prior_variance_samples_the_exact_posterior():
    y = gaussian_observations()
    errors = []
    for n in (200, 400):
        x = dps(y, n, 1.0, guidance="likelihood", noise_sigma=SIGMA_ZETA, prior_sigma=S)
        slope, var = posterior_fit(y, x)
        assert slope == pytest.approx(K, abs=0.005)
        errors.append(abs(var / POSTERIOR_VAR - 1))
    assert errors[1] < 0.06  # 4% at 400 levels (the ancestral step's first-order error) …
    assert errors[1] < 0.7 * errors[0]  # … and it shrinks as the grid is refined


def test_dps_likelihood_alone_overfits_the_observation():
    # DPS's likelihood N(y; D(x; t), σ_ζ²) ignores the uncertainty of x̂₀ at high t, so its
    # samples regress on y with slope ≈ 1 instead of k = 0.86: they keep the noise's scale
    # (the bias RESULTS.md reports for EMDiffusion's E-step).
    y = gaussian_observations()
    slope, var = posterior_fit(y, dps(y, 200, 1.0, guidance="likelihood",
                                      noise_sigma=SIGMA_ZETA))
    assert slope > 0.95 and var < 0.8 * POSTERIOR_VAR


def test_normalized_guidance_moves_each_sample_zeta_along_its_own_residual():
    # On the 2-level grid [t, 0] the sampler returns x̂₀ = D(x; t) − ζ·∇‖y − D(x; t)‖, and
    # ∇‖y − D‖ = −c_t·(y − D)/‖y − D‖ for the Gaussian denoiser (c_t = s²/(s²+t²)).
    t, zeta = 1.0, 0.3
    y = gaussian_observations(batch=6, dim=16)
    sigmas = np.array([t, 0.0])
    run = lambda z: np.asarray(sampler.dps_sample(gaussian_denoiser, PARAMS, y, sigmas, z,  # noqa: E731
                                                  key=jax.random.PRNGKey(5)))
    unguided, guided = run(0.0), run(zeta)
    residual = np.asarray(y) - unguided
    c_t = S**2 / (S**2 + t**2)
    expected = unguided + zeta * c_t * residual / np.linalg.norm(residual, axis=1,
                                                                 keepdims=True)
    np.testing.assert_allclose(guided, expected, atol=1e-5)


def test_a_sample_does_not_depend_on_the_rest_of_its_batch():
    # The EMDiffusion code takes one norm over the whole batch; here each example has its own.
    y = np.asarray(gaussian_observations(batch=4, dim=8))
    other = y.copy()
    other[2:] = 3.0 * other[2:]
    outs = [dps(jnp.asarray(v), 20, 2.0) for v in (y, other)]
    np.testing.assert_allclose(outs[0][:2], outs[1][:2], atol=1e-6)
    assert not np.allclose(outs[0][2:], outs[1][2:])


def test_one_evaluation_with_its_gradient_per_level():
    calls = []

    def counting(params, x, sigma, labels=None):
        calls.append(1)
        return gaussian_denoiser(params, x, sigma)

    sigmas = sampler.karras_sigmas(12)
    with jax.disable_jit():
        sampler.dps_sample(counting, PARAMS, jnp.zeros((2, 3)), sigmas, 1.0,
                           key=jax.random.PRNGKey(0))
    assert len(calls) == 12 == sampler.num_dps_evaluations(sigmas)


@pytest.mark.parametrize("kw", [{}, {"guidance": "likelihood", "noise_sigma": 0.2,
                                     "prior_sigma": 0.5}])
def test_sharded_dps_sampler_is_dps_sample_on_one_or_two_devices(two_devices, kw):
    # The sharded sampler dispatches one jitted level at a time; dps_sample scans them.
    sigmas = sampler.karras_sigmas(16)
    y = jax.random.normal(jax.random.PRNGKey(4), (8, 4, 4, 1))
    key = jax.random.PRNGKey(0)
    outs = []
    for n in (1, 2):
        mesh = devices.make_data_mesh(n)
        fn = sampler.make_sharded_dps_sampler(gaussian_denoiser, mesh, sigmas, 0.5, **kw)
        outs.append(np.asarray(fn(PARAMS, y, None, key)))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    scanned = sampler.dps_sample(gaussian_denoiser, PARAMS, y, sigmas, 0.5, key=key, **kw)
    np.testing.assert_allclose(outs[0], np.asarray(scanned), rtol=1e-5, atol=1e-5)


def test_bad_guidance_is_refused():
    y = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown DPS guidance"):
        sampler.dps_sample(gaussian_denoiser, PARAMS, y, sampler.karras_sigmas(4), 1.0,
                           key=jax.random.PRNGKey(0), guidance="exact")
    with pytest.raises(ValueError, match="noise_sigma"):
        sampler.dps_sample(gaussian_denoiser, PARAMS, y, sampler.karras_sigmas(4), 1.0,
                           key=jax.random.PRNGKey(0), guidance="likelihood")
