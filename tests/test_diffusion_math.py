"""EDM preconditioning, loss weighting, σ sampling and grids against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfbd_jax.diffusion import edm
from sfbd_jax.diffusion.sampler import karras_sigmas, num_evaluations, sigmas_from_level
from sfbd_jax.models.precond import edm_coefficients


def test_edm_coefficients_hand_values():
    # σ = σ_d = 0.5: σ²+σ_d² = 0.5.
    c_skip, c_out, c_in, c_noise = edm_coefficients(jnp.array(0.5), 0.5)
    assert c_skip == pytest.approx(0.5)
    assert c_out == pytest.approx(0.25 / math.sqrt(0.5))  # 0.353553
    assert c_in == pytest.approx(1 / math.sqrt(0.5))  # 1.414214
    assert c_noise == pytest.approx(math.log(0.5) / 4)  # -0.173287
    # σ = 2: σ²+σ_d² = 4.25.
    c_skip, c_out, c_in, c_noise = edm_coefficients(jnp.array(2.0), 0.5)
    assert c_skip == pytest.approx(0.25 / 4.25)
    assert c_out == pytest.approx(1.0 / math.sqrt(4.25))
    assert c_in == pytest.approx(1 / math.sqrt(4.25))
    assert c_noise == pytest.approx(math.log(2.0) / 4)


def test_loss_weight_hand_values():
    assert edm.loss_weight(jnp.array(0.5), 0.5) == pytest.approx(0.5 / 0.0625)  # 8
    assert edm.loss_weight(jnp.array(1.0), 0.5) == pytest.approx(1.25 / 0.25)  # 5


def test_sigma_sampling_is_lognormal():
    sigma = edm.sample_sigma(jax.random.PRNGKey(0), 200_000, -1.2, 1.2)
    logs = np.log(np.asarray(sigma))
    assert logs.mean() == pytest.approx(-1.2, abs=0.01)
    assert logs.std() == pytest.approx(1.2, abs=0.01)


def test_karras_grid_hand_values():
    grid = karras_sigmas(3, 0.002, 80.0, 7.0)
    # middle level: ((80^(1/7) + 0.002^(1/7)) / 2)^7
    np.testing.assert_allclose(grid, [80.0, 2.515219, 0.002, 0.0], rtol=1e-6)
    grid = karras_sigmas(18)
    assert grid.shape == (19,)
    np.testing.assert_allclose(grid[:3], [80.0, 57.585985, 40.785574], rtol=1e-6)
    assert grid[-2] == pytest.approx(0.002) and grid[-1] == 0.0
    assert np.all(np.diff(grid) < 0)
    assert num_evaluations(grid) == 35  # 2N − 1 for N = 18


def test_grid_from_level_truncates_and_inserts_start():
    full = karras_sigmas(40)
    grid = sigmas_from_level(0.2, 40)
    assert grid[0] == 0.2 and grid[-1] == 0.0
    np.testing.assert_allclose(grid[1:-1], full[(full < 0.2) & (full > 0)])
    assert np.all(np.diff(grid) < 0)
    assert grid[1] == pytest.approx(0.18459386, rel=1e-6)
    with pytest.raises(ValueError, match="sigma_start"):
        sigmas_from_level(0.0, 40)
