"""Online SFBD: the refresh schedule, the batch mixture, the refresh against the exact Gaussian
flow, resume after kills (bit-identical), bad inputs."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import kill_after_checkpoint, make_image_folder, tiny_config

from sfbd_jax.config_checks import validate_config
from sfbd_jax.data.prepared import PreparedDataset
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.diffusion import sampler as sampler_lib
from sfbd_jax.methods import online_sfbd as online
from sfbd_jax.run import run
from sfbd_jax.utils import checkpoints, devices, jsonfile

MU, S = 0.1, 0.5  # the Gaussian data model whose exact denoiser the flow test plugs in


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """21 smooth 8×8 grey images: 8 clean + 13 noisy (a prime)."""
    return make_image_folder(tmp_path_factory.mktemp("online_imgs"), 21, seed=1)


def online_config(folder, **online):
    c = tiny_config(image_size=8)
    c.mode = "online_sfbd"
    c.data.source, c.data.folder = "folder", folder
    c.corrupt.clean_count = 8
    c.corrupt.sigma = 0.2
    c.sfbd.pretrain_images = 32  # 4 steps of 8
    c.sfbd.backward_num_steps = 8
    c.sfbd.denoise_batch_size = 8
    c.online.train_images = 48  # 6 online steps
    c.online.refresh_every_steps = 2
    c.online.refresh_count = 5  # odd: padded to 6 on 2 devices
    c.online.ramp_start, c.online.ramp_end = 0, 2
    c.train.checkpoint_every_steps = 2
    c.train.log_every_steps = 2
    for key, value in online.items():
        c.online[key] = value
    return c


# ----- the schedule ----------------------------------------------------------------------------
def test_refreshes_cover_every_noisy_image_once_per_cycle():
    n, c = 13, 5
    order = online.refresh_order(n, seed=3)
    assert sorted(order) == list(range(n))
    seq = np.concatenate([online.refresh_rows(order, j, c) for j in range(13)])  # 65 = 5 cycles
    for j in range(13):
        assert len(set(online.refresh_rows(order, j, c))) == c  # distinct within a refresh
    for cycle in range(5):
        assert sorted(seq[cycle * n:(cycle + 1) * n]) == list(range(n))
    assert [online.refreshes_before(u, 2) for u in range(6)] == [0, 1, 1, 2, 2, 3]
    assert online.covered(2, c, n) == 10 and online.covered(3, c, n) == 13


def test_buffer_weight_ramp_and_mixture():
    ramp = [online.buffer_weight(u, 10, 20) for u in (0, 10, 15, 20, 30)]
    assert ramp == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert online.buffer_weight(5, 5, 5) == 1.0 and online.buffer_weight(4, 5, 5) == 0.0
    assert online.buffer_probability(1.0, 30, 10, 0.0) == pytest.approx(0.75)  # uniform
    assert online.buffer_probability(0.5, 30, 10, 0.0) == pytest.approx(15 / 25)
    assert online.buffer_probability(1.0, 30, 10, 0.2) == pytest.approx(0.8)
    assert online.buffer_probability(0.0, 30, 10, 0.2) == 0.0


def test_batches_never_draw_entries_not_yet_denoised():
    n_clean, n_noisy = 4, 13
    cfg = online_config("unused").online
    cfg.refresh_count, cfg.refresh_every_steps, cfg.ramp_start, cfg.ramp_end = 3, 2, 0, 4
    order = online.refresh_order(n_noisy, 0)
    union = ImageDataset(np.zeros((n_clean + n_noisy, 8, 8, 1), np.float32), None, 0, "u")
    batches = online.OnlineBatches(union, n_clean, order, cfg, 64, 1, 0,
                                   devices.make_data_mesh(1), 0, False)
    for u in range(12):
        idx, _ = batches.draw(u)
        buffer_rows = idx[idx >= n_clean] - n_clean
        n = online.covered(u // 2 + 1, 3, n_noisy)
        assert set(buffer_rows) <= set(order[:n]), u
        w, _, p = batches.buffer_share(u)
        if w == 0.0:
            assert len(buffer_rows) == 0
        assert p == pytest.approx(w * n / (n_clean + w * n))
        assert np.array_equal(batches.draw(u)[0], idx)  # a function of (seed, step)
    # At full weight and coverage the mixture is uniform over clean ∪ buffer.
    drawn = np.concatenate([batches.draw(u)[0] for u in range(100, 200)])
    assert np.mean(drawn >= n_clean) == pytest.approx(13 / 17, abs=0.02)


# ----- the refresh against the exact Gaussian flow, 2 devices ---------------------------------
def test_refresh_is_the_exact_flow_of_the_gaussian_denoiser(tmp_path, image_folder,
                                                            monkeypatch, two_devices):
    def gaussian(params, x, sigma, labels=None, **kw):
        sigma = sigma.reshape((-1, 1, 1, 1))
        return MU + S**2 / (S**2 + sigma**2) * (x - MU)

    real = online.OnlineSFBDRun._make_sampler

    def with_gaussian(self):
        real(self)  # the grid and the evaluation count, as the run builds them
        cfg, sc = self.config.sfbd, self.config.sampler
        sigmas = sampler_lib.sigmas_from_level(self.sigma_zeta, cfg.backward_num_steps,
                                               sc.sigma_min, sc.sigma_max, sc.rho)
        return sampler_lib.make_sharded_sampler(gaussian, self.experiment.mesh, sigmas)

    monkeypatch.setattr(online.OnlineSFBDRun, "_make_sampler", with_gaussian)
    config = online_config(image_folder, refresh_every_steps=1, train_images=56)
    config.sfbd.backward_num_steps = 40
    workdir = str(tmp_path / "gauss")
    run(config, workdir)
    noisy, _ = PreparedDataset(os.path.join(workdir, "data")).noisy()
    y = np.asarray(noisy.images)
    order = online.refresh_order(13, config.seed)
    refreshed = []
    for j in range(7):  # 7 online steps, one refresh before each: 35 rows = 2.7 cycles
        record = jsonfile.read_json(f"{workdir}/online/refresh_{j:08d}.json", None)
        assert record["rows"] == 5 and record["step"] == 4 + j
        rows = online.refresh_rows(order, j, 5)
        got = np.load(f"{workdir}/online/refresh_{j:08d}.npy")
        exact = MU + (y[rows] - MU) * S / np.sqrt(S**2 + 0.2**2)
        np.testing.assert_allclose(got, exact, atol=2e-3)
        refreshed.extend(rows)
    assert sorted(refreshed[:13]) == sorted(refreshed[13:26]) == list(range(13))
    summary = jsonfile.read_json(f"{workdir}/{online.SUMMARY}", [])
    last = summary[-1]
    assert last["refreshes"] == 7 and last["coverage"] == 1.0
    per_image = sampler_lib.num_evaluations(sampler_lib.sigmas_from_level(
        0.2, 40, config.sampler.sigma_min, config.sampler.sigma_max, config.sampler.rho))
    assert last["denoise_evaluations"] == 7 * 5 * per_image


# ----- resume ----------------------------------------------------------------------------------
def test_online_sfbd_resumes_bit_identically_after_kills(tmp_path, image_folder, monkeypatch):
    straight = run(online_config(image_folder), str(tmp_path / "straight"))
    assert int(straight.step) == 4 + 6
    workdir = str(tmp_path / "killed")
    real_refresh, real_write = online.OnlineSFBDRun._refresh, jsonfile.write_json
    kill_after_save = kill_after_checkpoint

    def kill_in_refresh(j_kill):
        def write_json(path, value):  # the refresh's images are written, its record not yet
            if path.endswith(f"refresh_{j_kill:08d}.json"):
                raise KeyboardInterrupt("killed inside a refresh")
            real_write(path, value)
        return write_json

    def kill_after_refresh(j_kill):
        def refresh(self, j, state):
            real_refresh(self, j, state)
            if j == j_kill:
                raise KeyboardInterrupt("killed between a refresh and its training step")
        return refresh

    # Mid-pretraining (after checkpoint 2); inside refresh 1 (online step 2, step 6, after
    # checkpoint 6); right after refresh 2 (step 8) before its step; after the last checkpoint
    # (step 10) before the final evaluation.
    for patch in ((checkpoints.Checkpointer, "save", kill_after_save(2)),
                  (jsonfile, "write_json", kill_in_refresh(1)),
                  (online.OnlineSFBDRun, "_refresh", kill_after_refresh(2)),
                  (checkpoints.Checkpointer, "save", kill_after_save(10))):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            with pytest.raises(KeyboardInterrupt):
                run(online_config(image_folder), workdir)
    resumed = run(online_config(image_folder), workdir)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for j in range(3):  # the buffer: every refresh's images
        np.testing.assert_array_equal(
            np.load(f"{workdir}/online/refresh_{j:08d}.npy"),
            np.load(f"{tmp_path}/straight/online/refresh_{j:08d}.npy"))
    with open(f"{workdir}/{online.SUMMARY}") as f:
        killed_summary = json.load(f)
    with open(f"{tmp_path}/straight/{online.SUMMARY}") as f:
        straight_summary = json.load(f)
    assert [r["model_sha256"] for r in killed_summary] == [
        r["model_sha256"] for r in straight_summary]
    # A refresh file the buffer needs is damaged: a named error, not a silent rebuild.
    with open(f"{workdir}/online/refresh_{2:08d}.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    config = online_config(image_folder, train_images=64)
    with pytest.raises(Exception, match="refresh_00000002"):
        run(config, workdir)


# ----- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"refresh_count": 14}, "larger than the noisy set"),
    ({"ramp_start": 5, "ramp_end": 4}, "ramp_end"),
    ({"refresh_every_steps": 0}, "refresh_every_steps"),
    ({"clean_share": 1.0}, "clean_share"),
    ({"eval_every_steps": -2}, "eval_every_steps"),
    ({"denoise_with": "live"}, "denoise_with"),
])
def test_bad_online_settings_are_refused_before_training(image_folder, change, message):
    with pytest.raises(ValueError, match=message):
        validate_config(online_config(image_folder, **change))


def test_online_sfbd_refuses_other_corruptions(image_folder):
    config = online_config(image_folder)
    config.corrupt.type = "gaussian_blur"
    with pytest.raises(ValueError, match="gaussian_noise"):
        validate_config(config)
