"""Multi-host for real: 2 processes on localhost (CPU backend, 2 host devices each, gloo
collectives), started by ``launch/local.sh --processes 2``, run a tiny SFBD round and must
produce the parameters and denoised set of a 1-process run on the same 4-device mesh."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Adam's eps at 1e-8 turns round-off in near-zero gradients (the summation order of the
# cross-process all-reduce differs from the in-process one) into lr-sized steps; at 1e-3 the
# two runs can be compared to float32 round-off.
OVERRIDES = ["--config.sfbd.rounds=1", "--config.sfbd.eval_every_round=false",
             "--config.optim.eps=1e-3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, *options, overrides=OVERRIDES) -> subprocess.Popen:
    """launch/local.sh with the test's Python, started in the background."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # the device count comes from config.num_cpu_devices
    return subprocess.Popen(["bash", "launch/local.sh", *options, "configs/sfbd_smoke.py",
                             str(workdir), *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logs(workdir, proc: subprocess.Popen) -> list[str]:
    """Waits for ``proc``; returns the processes' logs."""
    stdout, stderr = proc.communicate(timeout=900)
    logs_dir = workdir / "logs"
    logs = ([(logs_dir / name).read_text() for name in sorted(os.listdir(logs_dir))]
            if logs_dir.exists() else [stdout + stderr])
    assert proc.returncode == 0, "\n".join(log[-3000:] for log in logs) + stderr[-3000:]
    return logs


def _one_and_two(one, two, overrides, overrides_two=None) -> list[str]:
    """The same job as 1 process × 4 devices in ``one`` and 2 × 2 in ``two`` (there with
    ``overrides_two`` when given), side by side; returns the two processes' logs."""
    single = _start(one, "--devices-per-process", "4", overrides=overrides)
    pair = _start(two, "--processes", "2", "--devices-per-process", "2", "--port",
                  str(_free_port()), overrides=overrides_two or overrides)
    try:
        logs = _logs(two, pair)
        _logs(one, single)
    finally:
        for proc in (single, pair):
            if proc.poll() is None:
                proc.kill()
    assert len(logs) == 2
    return logs


def _state(workdir, folder: str = "checkpoints", step: int | None = None):
    """The state saved in ``workdir/folder`` at ``step`` (the latest when None)."""
    sys.path.insert(0, REPO)
    from configs import sfbd_smoke
    from sfbd_jax.training import loop
    from sfbd_jax.utils import checkpoints

    experiment = loop.Experiment(sfbd_smoke.get_config())
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, folder), None, enable_async=False)
    try:
        step = max(ckpt.all_steps()) if step is None else step
        return ckpt.restore(step, experiment.abstract_state())
    finally:
        ckpt.close()


def _assert_states_close(a, b) -> None:
    assert int(a.step) == int(b.step)
    for x, y in zip(jax.tree.leaves((a.params, a.ema_params)),
                    jax.tree.leaves((b.params, b.ema_params)), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    logs = _one_and_two(one, two, OVERRIDES)  # side by side: mostly start-up, a core each
    for i, log in enumerate(logs):
        assert f"process {i}/2" in log
    # One data set, one denoised set and one checkpoint series, written once.
    assert sorted(os.listdir(two / "denoised" / "round_1")) == sorted(
        os.listdir(one / "denoised" / "round_1"))
    for name in sorted(os.listdir(one / "denoised" / "round_1")):
        if name.endswith(".npy"):
            # float16 storage: round-off of the float32 sums may flip the last bit (2^-10).
            np.testing.assert_allclose(np.load(two / "denoised" / "round_1" / name),
                                       np.load(one / "denoised" / "round_1" / name),
                                       rtol=2**-10, atol=1e-5)
    for k in (0, 1):
        _assert_states_close(_state(one, "rounds", k), _state(two, "rounds", k))


# Ambient-Omni on the smoke data (σ_ζ = 0.2 noisy images used above σ_min = 0.5), then the
# evaluation of its checkpoint: samples, the feature classifier and the reference statistics
# (each run directory its own cache, so each trains and computes its own).
AMBIENT = ["--config.mode=ambient", "--config.train.total_images=64",
           "--config.ambient.annotation=fixed", "--config.optim.eps=1e-3"]


def _eval_overrides(workdir) -> list[str]:
    return [*AMBIENT, "--mode=eval", f"--config.eval.cache_dir={workdir}/cache",
            "--config.eval.metrics=classifier_fd,swd,memorisation",
            "--config.eval.num_samples=32", "--config.eval.batch_size=16",
            "--config.eval.classifier.steps=30", "--config.eval.swd_projections=16"]


@pytest.mark.slow
def test_ambient_and_its_evaluation_on_two_processes_match_one_process(tmp_path):
    import json

    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    logs = _one_and_two(one, two, AMBIENT)
    for i, log in enumerate(logs):
        assert f"process {i}/2" in log and "Ambient-Omni" in log
    _assert_states_close(_state(one), _state(two))
    os.rename(two / "logs", two / "train_logs")  # the evaluation's logs apart
    _one_and_two(one, two, _eval_overrides(one), _eval_overrides(two))
    results = [json.loads(next((d / "eval").glob("step*.json")).read_text()) for d in (one, two)]
    numbers = [k for k, v in results[0].items() if isinstance(v, float) and "seconds" not in k]
    assert {"classifier_fd", "swd"} <= set(numbers) and results[0].keys() == results[1].keys()
    for key in numbers:
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-3, abs=1e-4), key


def test_distributed_settings_are_all_or_none():
    from sfbd_jax.utils import devices

    with pytest.raises(ValueError, match="all of coordinator_address"):
        devices.initialize_distributed("localhost:1234", None, 0)
