"""SFBD backward step: every noisy image denoised exactly once, resumable, closer to the truth."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler import PARAMS, S, gaussian_denoiser

from sfbd_jax.data import shards
from sfbd_jax.diffusion import sampler
from sfbd_jax.methods import backward
from sfbd_jax.utils import devices

MU = float(PARAMS[0])
SIGMA_ZETA = 0.2
SETTINGS = {"round": 1, "sigma": SIGMA_ZETA}


def gaussian_problem(n=13, seed=0):
    rng = np.random.default_rng(seed)
    clean = (MU + S * rng.normal(size=(n, 4, 4, 1))).astype(np.float32)
    noisy = (clean + SIGMA_ZETA * rng.normal(size=clean.shape)).astype(np.float32)
    return clean, noisy


def sharded_sampler(n_devices):
    mesh = devices.make_data_mesh(n_devices)
    sigmas = sampler.sigmas_from_level(SIGMA_ZETA, 40)
    return mesh, sampler.make_sharded_sampler(gaussian_denoiser, mesh, sigmas)


def run(out_dir, noisy, sample, mesh, **kw):
    entries = backward.denoise_set(sample, PARAMS, noisy, str(out_dir), mesh=mesh, batch_size=4,
                                   shard_size=8, key=jax.random.PRNGKey(0), settings=SETTINGS,
                                   **kw)
    return entries, shards.read_all(str(out_dir), sorted(entries, key=lambda e: e["start"]))


def test_every_image_once_with_a_partial_last_batch(tmp_path, two_devices):
    clean, noisy = gaussian_problem()
    mesh, sample = sharded_sampler(2)
    entries, out = run(tmp_path, noisy, sample, mesh)
    assert [e["rows"] for e in entries] == [8, 5]
    assert out.shape == noisy.shape
    # The exact flow maps each y to μ + s/√(s²+σ_ζ²)(y − μ): row order and values preserved.
    exact = MU + S / np.sqrt(S**2 + SIGMA_ZETA**2) * (noisy - MU)
    np.testing.assert_allclose(out, exact, atol=2e-3)


def test_count_check_catches_a_dropped_or_duplicated_image():
    entries = [{"file": "a", "start": 0, "rows": 8}, {"file": "b", "start": 8, "rows": 5}]
    backward.check_complete(entries, 13)
    with pytest.raises(backward.CountCheckError, match="holds 12 images"):
        backward.check_complete([entries[0], {"file": "b", "start": 8, "rows": 4}], 13)
    with pytest.raises(backward.CountCheckError, match="missing"):
        backward.check_complete([entries[1]], 13)
    with pytest.raises(backward.CountCheckError, match="duplicated"):
        backward.check_complete([entries[0], {"file": "c", "start": 4, "rows": 9}], 13)


def test_resume_after_a_kill_reuses_written_shards(tmp_path):
    _, noisy = gaussian_problem()
    mesh, sample = sharded_sampler(1)
    calls = []

    def dying(*args):
        calls.append(1)
        if len(calls) == 3:  # the first batch of the second shard
            raise KeyboardInterrupt("killed")
        return sample(*args)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "k", noisy, dying, mesh)
    first = tmp_path / "k" / "denoised-000000000.npy"
    mtime = os.path.getmtime(first)
    calls.clear()
    _, resumed = run(tmp_path / "k", noisy, lambda *a: calls.append(1) or sample(*a), mesh)
    assert len(calls) == 2  # only the second shard's two batches
    assert os.path.getmtime(first) == mtime
    _, straight = run(tmp_path / "s", noisy, sample, mesh)
    np.testing.assert_array_equal(resumed, straight)
    # A pass recorded with other inputs (here another model) is recomputed, never reused.
    calls.clear()
    other = {**SETTINGS, "model_sha256": "another model"}
    backward.denoise_set(lambda *a: calls.append(1) or sample(*a), PARAMS, noisy,
                         str(tmp_path / "s"), mesh=mesh, batch_size=4, shard_size=8,
                         key=jax.random.PRNGKey(0), settings=other)
    assert len(calls) == 4  # every batch again
    with open(tmp_path / "s" / backward.PROGRESS) as f:
        assert json.load(f)["settings"] == other


def test_a_diverged_model_stops_the_backward_pass_before_writing(tmp_path):
    _, noisy = gaussian_problem()
    mesh, sample = sharded_sampler(1)

    def diverged(params, x, y, key):
        return sample(params, x, y, key).at[1].set(jnp.nan)

    # Row 1 of every batch of 4: noisy rows 1 and 5 of the first shard (rows 0..7).
    with pytest.raises(FloatingPointError, match=r"NaN or infinite images for 2 noisy row\(s\) "
                                                 r"\(1, 5\); nothing was written for rows 0..7"):
        run(tmp_path / "nan", noisy, diverged, mesh)
    assert not any(n.endswith((".npy", ".partial")) for n in os.listdir(tmp_path / "nan"))


def test_denoised_set_is_closer_to_the_clean_originals(tmp_path):
    clean, noisy = gaussian_problem(n=400, seed=1)
    mesh, sample = sharded_sampler(1)
    entries = backward.denoise_set(sample, PARAMS, noisy, str(tmp_path), mesh=mesh,
                                   batch_size=100, shard_size=200, key=jax.random.PRNGKey(0),
                                   settings=SETTINGS)
    out = shards.read_all(str(tmp_path), entries)
    mse_noisy = float(np.mean((noisy - clean) ** 2))
    mse_denoised = float(np.mean((out - clean) ** 2))
    assert mse_noisy == pytest.approx(SIGMA_ZETA**2, rel=0.1)
    assert mse_denoised < 0.95 * mse_noisy
    assert jnp.isfinite(out).all()


def test_conditional_denoising_passes_each_images_label(tmp_path, two_devices):
    """Conditional SFBD: a denoiser that adds its label shows every row got its own label,
    through padding and sharding over 2 devices."""
    _, noisy = gaussian_problem(n=13)
    labels = np.arange(13) % 5

    def labelled(params, x, sigma, y=None, **kw):
        return 0.0 * x + y.astype(jnp.float32)[:, None, None, None]

    mesh = devices.make_data_mesh(2)
    sample = sampler.make_sharded_sampler(labelled, mesh, sampler.sigmas_from_level(0.2, 4))
    _, out = run(tmp_path / "d", noisy, sample, mesh, labels=labels)
    np.testing.assert_allclose(out[:, 0, 0, 0], labels, atol=1e-5)
    with pytest.raises(ValueError, match="4 labels for 13 noisy images"):
        run(tmp_path / "e", noisy, sample, mesh, labels=labels[:4])
