"""Online SFBD: the refresh schedule, the batch mixture, the refresh against the exact Gaussian
flow, resume after kills (bit-identical), bad inputs."""

import json
import os
import types

import jax
import numpy as np
import pytest
from conftest import kill_after_checkpoint, make_image_folder, tiny_config

from sfbd_jax.config_checks import validate_config
from sfbd_jax.data.prepared import PreparedDataset
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.diffusion import sampler as sampler_lib
from sfbd_jax.evaluation import distances
from sfbd_jax.methods import online_sfbd as online
from sfbd_jax.run import run
from sfbd_jax.utils import checkpoints, devices, jsonfile

MU, S = 0.1, 0.5  # the Gaussian data model whose exact denoiser the flow test plugs in


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """21 smooth 8×8 grey images: 8 clean + 13 noisy (a prime)."""
    return make_image_folder(tmp_path_factory.mktemp("online_imgs"), 21, seed=1)


@pytest.fixture(scope="module")
def fixed_run(image_folder, tmp_path_factory):
    """One uninterrupted run of ``online_config`` (fixed refresh rule): (final state, workdir)."""
    workdir = str(tmp_path_factory.mktemp("online_fixed") / "run")
    return run(online_config(image_folder), workdir), workdir


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
def test_online_sfbd_resumes_bit_identically_after_kills(tmp_path, image_folder, monkeypatch,
                                                          fixed_run):
    straight, straight_dir = fixed_run
    assert int(straight.step) == 4 + 6
    workdir = str(tmp_path / "killed")
    real_refresh, real_write = online.OnlineSFBDRun._refresh, jsonfile.write_json
    kill_after_save = kill_after_checkpoint

    def kill_in_refresh(j_kill):
        def write_json(path, value, **kwargs):  # the refresh's images are written, not its record
            if path.endswith(f"refresh_{j_kill:08d}.json"):
                raise KeyboardInterrupt("killed inside a refresh")
            real_write(path, value, **kwargs)
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
            np.load(f"{straight_dir}/online/refresh_{j:08d}.npy"))
    with open(f"{workdir}/{online.SUMMARY}") as f:
        killed_summary = json.load(f)
    with open(f"{straight_dir}/{online.SUMMARY}") as f:
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


# ----- the adaptive refresh --------------------------------------------------------------------
def test_adaptive_commit_fraction_and_choice():
    assert online.commit_fraction(0.4, 0.1) == pytest.approx(0.75)  # KID down by 3/4
    assert online.commit_fraction(0.4, 0.5) == 0.0  # no closer: nothing replaced
    assert online.commit_fraction(0.4, 0.4) == 0.0
    assert online.commit_fraction(0.4, -0.3) == 1.0
    assert online.commit_fraction(-0.01, -0.02) == 1.0  # closer still though KID_old ≤ 0
    before = np.array([True, False, True, True, True, False, True])
    mask = online.committed_positions(before, 0.6, seed=0, j=3)
    assert mask[~before].all() and mask[before].sum() == 3  # round(0.6 · 5)
    assert np.array_equal(mask, online.committed_positions(before, 0.6, seed=0, j=3))
    choices = {tuple(online.committed_positions(before, 0.6, 0, j)) for j in range(10)}
    assert len(choices) > 1  # seeded per refresh
    assert online.committed_positions(before, 0.0, 0, 0).sum() == 2
    assert online.committed_positions(before, 1.0, 0, 0).all()


def test_adaptive_features_pixels_or_the_fid_inception(monkeypatch):
    """Pixels: the flattened images; 'inception': the evaluation's FID Inception extractor
    (its weights and batch from config.eval), built once."""
    from configs import default

    r = object.__new__(online.OnlineSFBDRun)
    r.config, r.experiment = default.get_config(), types.SimpleNamespace(mesh="mesh")
    images = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1) / 32
    np.testing.assert_array_equal(r._adaptive_features(images), images.reshape(2, 16))
    built = []

    def extractor(path, mesh, batch_size):
        built.append((path, mesh, batch_size))
        return types.SimpleNamespace(features=lambda x: x.mean(axis=(1, 2)))

    monkeypatch.setattr(online.features_lib, "inception_extractor", extractor)
    r.config.online.adaptive_features = "inception"
    r.config.eval.inception_weights, r.config.eval.batch_size = "/w/inception.npz", 16
    for _ in range(2):
        np.testing.assert_array_equal(r._adaptive_features(images), images.mean(axis=(1, 2)))
    assert built == [("/w/inception.npz", "mesh", 16)]


def _records(workdir):
    names = sorted(n for n in os.listdir(f"{workdir}/online") if n.endswith(".json")
                   and n.startswith("refresh_"))
    return {int(n[8:16]): jsonfile.read_json(f"{workdir}/online/{n}", None) for n in names}


def test_adaptive_refresh_committing_all_is_the_fixed_rule(tmp_path, image_folder,
                                                           monkeypatch, fixed_run):
    """q = 1 every time: the same parameters and buffer files as the fixed rule, bit for bit;
    q = 0: only rows never denoised are written (coverage as the fixed rule)."""
    fixed, fixed_dir = fixed_run
    monkeypatch.setattr(online, "commit_fraction", lambda old, new: 1.0)
    everything = run(online_config(image_folder, refresh_rule="adaptive"),
                     str(tmp_path / "all"))
    for a, b in zip(jax.tree.leaves(everything), jax.tree.leaves(fixed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for j in range(3):
        np.testing.assert_array_equal(np.load(f"{tmp_path}/all/online/refresh_{j:08d}.npy"),
                                      np.load(f"{fixed_dir}/online/refresh_{j:08d}.npy"))
    # The KIDs it recorded: refresh 2's 2 candidates seen before (pixels, clipped) and the
    # entries refresh 0 gave them, each against the clean subset.
    record = _records(tmp_path / "all")[2]
    rows = np.asarray(record["committed_rows"])
    first = _records(tmp_path / "all")[0]["committed_rows"]
    seen = np.isin(rows, first)
    assert record["candidates_seen_before"] == seen.sum() == 2
    clean = PreparedDataset(f"{tmp_path}/all/data").clean().images.reshape(8, -1)
    old = np.load(f"{tmp_path}/all/online/refresh_{0:08d}.npy")[
        [first.index(r) for r in rows[seen]]]
    new = np.load(f"{tmp_path}/all/online/refresh_{2:08d}.npy")[seen]
    flat = lambda x: np.clip(x, -1, 1).reshape(len(x), -1)
    assert record["kid_replaced"] == pytest.approx(
        distances.mmd2_unbiased(flat(old), clean), rel=1e-12)
    assert record["kid_candidates"] == pytest.approx(
        distances.mmd2_unbiased(flat(new), clean), rel=1e-12)
    monkeypatch.setattr(online, "commit_fraction", lambda old, new: 0.0)
    run(online_config(image_folder, refresh_rule="adaptive"), str(tmp_path / "none"))
    records = _records(tmp_path / "none")
    # 13 noisy, 5 per refresh: refreshes 0 and 1 meet only new rows; refresh 2 meets 3 new
    # rows and 2 denoised by refresh 0, which stay as they were.
    assert [records[j]["committed"] for j in range(3)] == [5, 5, 3]
    assert records[2]["candidates_seen_before"] == 2
    assert records[2]["commit_fraction"] == 0.0
    assert np.isfinite(records[2]["kid_replaced"]) and np.isfinite(records[2]["kid_candidates"])
    seen = set(records[0]["committed_rows"]) | set(records[1]["committed_rows"])
    assert not seen & set(records[2]["committed_rows"])
    assert len(seen | set(records[2]["committed_rows"])) == 13  # coverage: every row


def test_adaptive_refresh_resumes_bit_identically(
        tmp_path, image_folder, monkeypatch):
    """A seeded half committed (q = 0.5) over two cycles with pruning, killed inside a
    refresh and after one: bit-identical."""
    monkeypatch.setattr(online, "commit_fraction", lambda old, new: 0.5)
    long = online_config(image_folder, refresh_rule="adaptive", train_images=96)  # 6 refreshes
    straight = run(long, str(tmp_path / "straight"))
    records = _records(tmp_path / "straight")
    # Refresh 2: 3 new rows + 1 of 2; refreshes 3-5 meet 5 denoised rows each, commit 3.
    assert [records[j]["committed"] for j in (2, 3, 4, 5)] == [4, 3, 3, 3]
    workdir = str(tmp_path / "killed")
    real_refresh, real_write = online.OnlineSFBDRun._refresh, jsonfile.write_json

    def kill_in_refresh(path, value, **kwargs):
        if path.endswith(f"refresh_{4:08d}.json"):
            raise KeyboardInterrupt("killed inside a refresh")
        real_write(path, value, **kwargs)

    def kill_after_refresh(self, j, state):
        real_refresh(self, j, state)
        if j == 5:
            raise KeyboardInterrupt("killed after a refresh")

    for patch in ((jsonfile, "write_json", kill_in_refresh),
                  (online.OnlineSFBDRun, "_refresh", kill_after_refresh)):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            with pytest.raises(KeyboardInterrupt):
                run(long, workdir)
    resumed = run(long, workdir)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _records(workdir) == records


def test_buffer_rebuild_takes_each_entry_from_its_latest_commit(tmp_path):
    """With partial commits the buffer is not the last cycle of refreshes: the rebuild walks
    back to each row's latest commit, and pruning keeps exactly the files that hold one."""
    from configs import default

    r = object.__new__(online.OnlineSFBDRun)
    r.refresh_dir, r._records, r.order, r.noisy = str(tmp_path), {}, np.arange(6), np.zeros(6)
    r.config, r.pretrain_steps = default.get_config(), 0
    r.config.online.refresh_count, r.config.online.refresh_every_steps = 3, 1
    commits = {0: [0, 1, 2], 1: [3, 4, 5], 2: [0, 1], 3: [3, 4, 5], 4: [2]}
    for j, rows in commits.items():
        jsonfile.write_json(f"{tmp_path}/refresh_{j:08d}.json", {"committed_rows": rows})
        np.save(f"{tmp_path}/refresh_{j:08d}.npy", np.zeros(len(rows)))
    plan = {j: list(p) for j, p in r._latest_commits(5).items()}
    assert plan == {4: [0], 3: [0, 1, 2], 2: [0, 1]}
    # Before refresh 4, row 2's latest commit is refresh 0 (older than refresh 1, not needed).
    assert sorted(r._latest_commits(4)) == [0, 2, 3]
    assert list(r._latest_commits(2)) == [1, 0]
    r.ckpt = types.SimpleNamespace(all_steps=lambda: [4, 5])  # oldest kept: 4 refreshes made
    r._prune()
    assert sorted(int(n[8:16]) for n in os.listdir(tmp_path) if n.endswith(".json")) == [
        0, 2, 3, 4]
    assert sorted(r._latest_commits(5)) == [2, 3, 4]  # the pruned file is not needed
    os.remove(f"{tmp_path}/refresh_{0:08d}.json")  # a needed record lost
    r._records.clear()
    with pytest.raises(FileNotFoundError, match=r"1 buffer entries .*refresh_00000000.json"):
        r._latest_commits(4)


# ----- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"refresh_count": 14}, "larger than the noisy set"),
    ({"ramp_start": 5, "ramp_end": 4}, "ramp_end"),
    ({"refresh_every_steps": 0}, "refresh_every_steps"),
    ({"clean_share": 1.0}, "clean_share"),
    ({"eval_every_steps": -2}, "eval_every_steps"),
    ({"denoise_with": "live"}, "denoise_with"),
    ({"refresh_rule": "kid"}, "refresh_rule"),
    ({"refresh_rule": "adaptive", "adaptive_features": "classifier"}, "adaptive_features"),
    ({"refresh_rule": "adaptive", "adaptive_features": "inception"}, "inception_weights"),
])
def test_bad_online_settings_are_refused_before_training(image_folder, change, message):
    with pytest.raises(ValueError, match=message):
        validate_config(online_config(image_folder, **change))


def test_online_sfbd_refuses_other_corruptions(image_folder):
    config = online_config(image_folder)
    config.corrupt.type = "gaussian_blur"
    with pytest.raises(ValueError, match="gaussian_noise"):
        validate_config(config)
