"""SFBD end to end on a tiny folder data set: phases, per-round outputs, resume after kills."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import (
    flip_bytes,
    kill_after_checkpoint,
    largest_data_file,
    make_image_folder,
    tiny_config,
)

from sfbd_jax.data import shards
from sfbd_jax.methods import backward
from sfbd_jax.run import run
from sfbd_jax.utils import checkpoints


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """40 smooth 8×8 grey images."""
    return make_image_folder(tmp_path_factory.mktemp("imgs"), 40, seed=0)


def sfbd_config(folder):
    c = tiny_config(image_size=8)
    c.mode = "sfbd"
    c.data.source, c.data.folder = "folder", folder
    c.corrupt.clean_count = 8
    c.corrupt.sigma = 0.2
    c.sfbd.pretrain_images = 32  # 4 steps of 8
    c.sfbd.rounds = 2
    c.sfbd.images_per_round = 32
    c.sfbd.backward_num_steps = 8
    c.sfbd.denoise_batch_size = 8
    c.sfbd.denoise_shard_size = 16  # 32 noisy images: 2 shards per round
    c.sfbd.eval_every_round = False
    c.train.checkpoint_every_steps = 2
    c.train.log_every_steps = 2
    return c


def read_summary(workdir):
    with open(os.path.join(workdir, "sfbd_summary.json")) as f:
        return json.load(f)


def test_sfbd_runs_all_phases_and_resumes_after_kills(tmp_path, image_folder, monkeypatch,
                                                      two_devices):
    straight = run(sfbd_config(image_folder), str(tmp_path / "straight"))
    assert int(straight.step) == 4 + 2 * 4
    summary = read_summary(str(tmp_path / "straight"))
    assert [r["round"] for r in summary] == [0, 1, 2]
    assert summary[0]["noisy_psnr"] == pytest.approx(10 * np.log10(4 / 0.04), abs=0.7)
    assert all(np.isfinite(r["denoised_psnr"]) for r in summary[1:])
    assert checkpoints.Checkpointer(str(tmp_path / "straight" / "rounds")).all_steps() == [
        0, 1, 2]
    for k in (1, 2):
        with open(tmp_path / "straight" / "denoised" / f"round_{k}" / "progress.json") as f:
            assert sum(e["rows"] for e in json.load(f)["shards"]) == 32
    assert os.path.exists(tmp_path / "straight" / "samples" / "round2.png")
    assert summary[2]["samples"] == os.path.join("samples", "round2.png")  # relative: movable
    assert any(n.startswith("events.out") for n in os.listdir(tmp_path / "straight" / "progress"))

    # Kill the same run three times: mid-pretraining (after the step-2 checkpoint), in round
    # 1's denoising (after its first shard), and mid round-2 fine-tuning (after step 10).
    workdir = str(tmp_path / "killed")
    real_commit = shards.commit
    kill_after_save = kill_after_checkpoint

    def kill_after_shard(directory, relative, array):
        entry = real_commit(directory, relative, array)
        if "round_1" in directory and relative.endswith("000000016.npy"):
            raise KeyboardInterrupt("killed while denoising")
        return entry

    # Also right after the checkpoint that ends round 1's training (step 8), before the round
    # is recorded: the resumed run must still report that phase's loss.
    for patch in ((checkpoints.Checkpointer, "save", kill_after_save(2)),
                  (shards, "commit", kill_after_shard),
                  (checkpoints.Checkpointer, "save", kill_after_save(8)),
                  (checkpoints.Checkpointer, "save", kill_after_save(10))):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            with pytest.raises(KeyboardInterrupt):
                run(sfbd_config(image_folder), workdir)
    # Damage the two checkpoints of the unfinished round 2 (steps 8 and 10): the run stops
    # with the named error; with the fallback switch it restarts round 2 from rounds/1.
    for step in (8, 10):
        flip_bytes(largest_data_file(os.path.join(workdir, "checkpoints", str(step))))
    with pytest.raises(checkpoints.CheckpointError, match="step 10 is damaged"):
        run(sfbd_config(image_folder), workdir)
    config = sfbd_config(image_folder)
    config.train.fallback_to_intact_checkpoint = True
    resumed = run(config, workdir)
    assert sorted(os.listdir(workdir + "/checkpoints.damaged")) == ["10", "8"]
    assert int(resumed.step) == int(straight.step)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = [r["train_loss"] for r in read_summary(workdir)]
    assert all(np.isfinite(losses))
    assert losses == [r["train_loss"] for r in summary]
    for k in (1, 2):
        a = shards.read_all(workdir + f"/denoised/round_{k}", json.load(
            open(f"{workdir}/denoised/round_{k}/progress.json"))["shards"])
        b = shards.read_all(str(tmp_path / "straight" / "denoised" / f"round_{k}"), json.load(
            open(tmp_path / "straight" / "denoised" / f"round_{k}" / "progress.json"))["shards"])
        np.testing.assert_array_equal(a, b)


def test_sfbd_refuses_other_corruptions(image_folder, tmp_path):
    c = sfbd_config(image_folder)
    c.corrupt.type = "gaussian_blur"
    with pytest.raises(ValueError, match="gaussian_noise"):
        run(c, str(tmp_path))


def test_emdiffusion_e_step_runs_resumes_and_counts_its_cost(tmp_path, image_folder,
                                                             monkeypatch):
    # sfbd.backward = 'dps': the same rounds with EMDiffusion's E-step (a posterior sample of
    # every noisy image from σ_max) in place of the ODE from σ_ζ.
    def dps_config():
        c = sfbd_config(image_folder)
        c.sfbd.rounds = 1
        c.sfbd.backward, c.sfbd.dps_num_steps, c.sfbd.dps_zeta = "dps", 6, 0.5
        return c

    workdir = str(tmp_path / "dps")
    real_commit = shards.commit

    def kill_in_second_shard(directory, relative, array):  # the first one is recorded
        entry = real_commit(directory, relative, array)
        if "round_1" in directory and relative.endswith("000000016.npy"):
            raise KeyboardInterrupt("killed while sampling the posterior")
        return entry

    with monkeypatch.context() as m:
        m.setattr(shards, "commit", kill_in_second_shard)
        with pytest.raises(KeyboardInterrupt):
            run(dps_config(), workdir)
    first = os.path.join(workdir, "denoised", "round_1", "denoised-000000000.npy")
    mtime = os.path.getmtime(first)
    run(dps_config(), workdir)
    assert os.path.getmtime(first) == mtime  # the finished shard was reused
    summary = read_summary(workdir)
    assert summary[1]["denoise_evaluations"] == summary[1]["denoise_gradients"] == 32 * 6
    assert np.isfinite(summary[1]["denoised_psnr"])
    with open(os.path.join(workdir, "denoised", "round_1", "progress.json")) as f:
        settings = json.load(f)["settings"]
    assert settings["backward"] == "dps" and settings["dps_zeta"] == 0.5

    # An ODE pass's record has no DPS keys (records of older runs stay valid) and it
    # differentiates nothing: 5 evaluations per image on the 8-level grid below σ_ζ = 0.2.
    ode = sfbd_config(image_folder)
    assert backward.backward_settings(ode) == {}
    assert backward.cost_per_image(ode, 0.2) == (5, 0)


@pytest.mark.parametrize("key,value,message", [
    ("backward", "langevin", "'ode' \\(SFBD\\) or 'dps'"),
    ("dps_num_steps", 1, "dps_num_steps must be at least 2"),
    ("dps_guidance", "exact", "dps_guidance must be"),
    ("dps_zeta", -1.0, "dps_zeta must be ≥ 0"),
    ("dps_prior_variance", True, "'likelihood' only"),
])
def test_bad_backward_keys_are_named(image_folder, key, value, message):
    from sfbd_jax import config_checks

    c = sfbd_config(image_folder)
    c.sfbd.backward = "dps"
    setattr(c.sfbd, key, value)
    with pytest.raises(ValueError, match=message):
        config_checks.validate_config(c)
