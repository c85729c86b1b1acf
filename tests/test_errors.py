"""Bad input gets a clear error naming the problem."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import flip_bytes, largest_data_file, tiny_config
from test_training import tiny_dataset

from sfbd_jax.data import pipeline
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.training.loop import Experiment, check_finite_loss
from sfbd_jax.utils import devices


def test_images_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8, 3\).*expected \(N, 8, 8, 1\)"):
        pipeline.validate_images(np.zeros((4, 8, 8, 3), np.float32), (8, 8, 1), "x")


def test_images_outside_unit_range():
    images = np.zeros((4, 8, 8, 1), np.float32)
    images[0, 0, 0, 0] = 255.0
    with pytest.raises(ValueError, match=r"outside \[-1, 1\]"):
        pipeline.validate_images(images, (8, 8, 1), "x")
    images[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pipeline.validate_images(images, (8, 8, 1), "x")


def test_training_refuses_mismatched_data(tmp_path):
    config = tiny_config()
    exp = Experiment(config, devices.make_data_mesh(1))
    bad = ImageDataset(np.zeros((16, 4, 4, 1), np.float32), None, 0, "small")
    with pytest.raises(ValueError, match="data set 'small'"):
        exp.train(exp.abstract_state(), bad, end_step=2, phase_start_step=0, data_seed=0,
                  checkpointer=None, writer=None, workdir=str(tmp_path))


def test_batch_not_divisible_by_device_count(two_devices):
    config = tiny_config()
    config.train.batch_size = 3
    with pytest.raises(ValueError, match="not a positive multiple of the number of devices"):
        Experiment(config, devices.make_data_mesh(2))


def test_bad_config_values_name_the_key():
    config = tiny_config()
    config.mode = "nonsense"
    with pytest.raises(ValueError, match="config.mode"):
        Experiment(config, devices.make_data_mesh(1))
    config = tiny_config()
    config.train.total_images = 0
    with pytest.raises(ValueError, match="config.train.total_images"):
        Experiment(config, devices.make_data_mesh(1))
    config = tiny_config()
    config.optim.decay_images = -1
    with pytest.raises(ValueError, match="config.optim.decay_images"):
        Experiment(config, devices.make_data_mesh(1))


def run_cli(*args: str, module: str = "sfbd_jax.main") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 1, no traceback, and the error on one line naming every fragment."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sfbd_jax: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_unknown_config_key_on_the_command_line(tmp_path):
    proc = run_cli("--config", "configs/mnist_edm.py", "--workdir", str(tmp_path),
                   "--config.train.no_such_key=1")
    assert_one_line_error(proc, "unknown config key 'train.no_such_key'", "mnist_edm.py")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("--config", "configs/mnist_edm.py", "--workdir", str(tmp_path),
                   "--config.train.batch_size=abc")
    assert_one_line_error(proc, "--config.train.batch_size=abc")


def test_benchmark_overrides_are_set_typed_and_name_a_bad_key():
    """``--set section.key=value`` of the benchmarks (config_checks.apply_overrides)."""
    from configs import default
    from sfbd_jax.config_checks import apply_overrides

    c = default.get_config()
    assert apply_overrides(c, ["optim.lr=3e-3", "model.channel_mult=(1, 2)"]) == {
        "optim.lr": 3e-3, "model.channel_mult": (1, 2)}
    assert c.optim.lr == 3e-3 and c.model.channel_mult == (1, 2)
    with pytest.raises(ValueError, match="the config has no key 'optim.no_such_key'"):
        apply_overrides(c, ["optim.no_such_key=1"])
    with pytest.raises(ValueError, match="the config has no key 'optim.lr.x'"):
        apply_overrides(c, ["optim.lr.x=1"])
    with pytest.raises(ValueError, match="expected section.key=value"):
        apply_overrides(c, ["optim.lr"])
    with pytest.raises(TypeError, match="lr"):
        apply_overrides(c, ["optim.lr=abc"])
    assert c.optim.lr == 3e-3  # nothing set by a refused override


@pytest.mark.parametrize("override, fragment", [
    ("--config.corrupt.sigma=-1", "config.corrupt.sigma=-1.0 must be >= 0"),
    ("--config.corrupt.clean_count=70", "config.corrupt.clean_count=70 exceeds the 64 images"),
    ("--config.data.source=folder", "config.data.folder='' is not a directory"),
])
def test_bad_values_on_the_command_line(tmp_path, override, fragment):
    """One line, exit status 1, nothing made but errors.log (no data/, no data.partial/)."""
    workdir = tmp_path / "run"
    proc = run_cli("--config", "configs/sfbd_smoke.py", "--workdir", str(workdir), override)
    assert_one_line_error(proc, fragment, str(workdir / "errors.log"))
    assert os.listdir(workdir) == ["errors.log"]


def test_a_damaged_checkpoint_on_the_command_line(tmp_path):
    """The CLI names the damaged step and file in one line; the traceback goes to
    errors.log (and to stderr with --verbose_errors); no file is deleted."""
    from configs import sfbd_smoke
    from sfbd_jax.utils.checkpoints import Checkpointer

    config = sfbd_smoke.get_config()
    config.mode = "edm"
    exp = Experiment(config, devices.make_data_mesh(1))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), enable_async=False)
    ckpt.save(2, exp.init_state())
    ckpt.close()
    target = largest_data_file(tmp_path / "checkpoints" / "2")
    flip_bytes(target)
    files_before = sorted(p for p, _, _ in os.walk(tmp_path / "checkpoints"))
    args = ("--config", "configs/sfbd_smoke.py", "--workdir", str(tmp_path),
            "--config.mode=edm", "--config.train.total_images=64")
    line = assert_one_line_error(run_cli(*args), "step 2 is damaged",
                                 os.path.basename(target), "fallback_to_intact_checkpoint")
    assert str(tmp_path / "errors.log") in line
    assert "Traceback" in (tmp_path / "errors.log").read_text()
    verbose = run_cli(*args, "--verbose_errors")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert sorted(p for p, _, _ in os.walk(tmp_path / "checkpoints")) == files_before


def test_nan_loss_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="training loss is not finite .* at step 7"):
        check_finite_loss(float("nan"), 7, checkpointer=_NoCheckpoint())


class _PoisonedBatches:
    """Batches of ``inner`` with one NaN pixel in the batch of (1-based) step ``step``."""

    def __init__(self, inner, step: int, per_dispatch: int):
        self.inner, self.per_dispatch = inner, per_dispatch
        self.dispatch, self.position = divmod(step - 1, per_dispatch)

    def get(self, first_step: int) -> dict:
        batch = self.inner.get(first_step)
        if first_step == self.dispatch * self.per_dispatch:
            batch = dict(batch, image=batch["image"].at[self.position, 0, 0, 0, 0].set(np.nan))
        return batch


@pytest.mark.parametrize("per_dispatch, bad_step", [(1, 3), (2, 4)])
def test_nonfinite_loss_names_its_own_step_whatever_the_log_cadence(tmp_path, per_dispatch,
                                                                    bad_step):
    """One NaN batch at step 3 (or 4, the second step of a dispatch): its gradient entries are
    zeroed (as in EDM) so the later losses are finite again; the error still names that step,
    although logs and checkpoints come only at step 8."""
    config = tiny_config()
    config.train.steps_per_dispatch = per_dispatch
    config.train.log_every_steps = config.train.checkpoint_every_steps = 8
    exp = Experiment(config, devices.make_data_mesh(1))
    inner = pipeline.TrainBatches(tiny_dataset(), config.train.batch_size, per_dispatch, 0,
                                  exp.mesh, num_classes=0)
    from sfbd_jax.utils.checkpoints import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "ckpt"), enable_async=False)

    class Writer:
        def write_scalars(self, *a):
            pass

    with pytest.raises(FloatingPointError,
                       match=rf"not finite \(NaN/inf\) at step {bad_step}; gradient entries "
                             rf"were first non-finite at step {bad_step};"):
        exp.train(exp.init_state(), tiny_dataset(), end_step=8, phase_start_step=0,
                  data_seed=0, checkpointer=ckpt, writer=Writer(), workdir=str(tmp_path),
                  batches=_PoisonedBatches(inner, bad_step, per_dispatch))
    assert ckpt.all_steps() == []


class _NoCheckpoint:
    directory = "/nowhere"

    def latest_step(self):
        return None


def test_diverging_run_raises_instead_of_saving(tmp_path):
    from sfbd_jax.utils.checkpoints import Checkpointer

    config = tiny_config()
    config.optim.lr = 1e30
    config.optim.warmup_images = 0
    exp = Experiment(config, devices.make_data_mesh(1))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), enable_async=False)

    class Writer:
        def write_scalars(self, *a):
            pass

    with pytest.raises(FloatingPointError, match="training loss is"):
        exp.train(exp.init_state(), tiny_dataset(), end_step=8, phase_start_step=0,
                  data_seed=0, checkpointer=ckpt, writer=Writer(), workdir=str(tmp_path))
    assert ckpt.all_steps() == []


@pytest.mark.parametrize("key, value, message", [
    ("corrupt.sigma", -0.1, r"config.corrupt.sigma=-0.1 must be >= 0"),
    ("corrupt.clean_count", 100, r"config.corrupt.clean_count=100 exceeds the 64 images"),
    ("sfbd.denoise_shard_size", 100, r"denoise_shard_size=100 must be a positive multiple"),
    ("sfbd.images_per_round", 4, r"config.sfbd.images_per_round must be at least one dispatch"),
    ("sfbd.pretrain_images", 4, r"config.sfbd.pretrain_images must be at least one dispatch"),
    ("data.source", "imagenet", r"config.data.source='imagenet' is unknown"),
    ("data.folder", "/no/such/folder", r"config.data.folder='/no/such/folder' is not a "),
    ("corrupt.label_flip", 1.5, r"config.corrupt.label_flip must lie in \[0, 1\)"),
])
def test_config_values_are_checked_before_any_work(tmp_path, key, value, message):
    """run() refuses a bad value before JAX starts or any data is read: the run directory is
    not even created."""
    from configs import sfbd_smoke
    from sfbd_jax.run import run

    config = sfbd_smoke.get_config()
    section, name = key.split(".")
    config[section][name] = value
    if key == "data.folder":
        config.data.source = "folder"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_ambient_keys_are_checked_before_any_work(tmp_path):
    from configs import ambient_mnist
    from sfbd_jax.run import run

    for key, value, message in (("annotation", "oracle", "config.ambient.annotation='oracle'"),
                                ("s_max", 1.0, "config.ambient.s_max must be > 1"),
                                ("annotation_file", "", "annotation_file=''")):
        config = ambient_mnist.get_config("blur")
        config.ambient[key] = value
        if key == "annotation_file":
            config.ambient.annotation = "file"
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            run(config, str(tmp_path / "run"))
        assert not os.path.exists(tmp_path / "run")


def test_a_failed_preparation_leaves_nothing_behind(tmp_path):
    from PIL import Image

    from sfbd_jax.data import prepare

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"broken")
    config = tiny_config()
    config.data.source, config.data.folder = "folder", str(folder)
    config.corrupt.clean_count, config.corrupt.output_dir = 2, str(tmp_path / "data")
    with pytest.raises(ValueError, match="bad.png"):
        prepare.prepare(config)
    assert sorted(os.listdir(tmp_path)) == ["imgs"]  # no data/, no data.partial/


def test_a_damaged_run_record_is_named_not_read_as_missing(tmp_path):
    """A run record cut short (config.json here) stops the command with one line naming the
    file; it is neither read as absent nor overwritten. A first record is written whole (no
    temporary file left) and kept when the run resumes with other values."""
    from configs import sfbd_smoke
    from sfbd_jax.training import loop

    config = sfbd_smoke.get_config()
    loop.write_run_config(config, str(tmp_path / "fresh"))
    assert os.listdir(tmp_path / "fresh") == [loop.RUN_CONFIG]
    first = loop.read_run_config(str(tmp_path / "fresh"))
    assert first["seed"] == config.seed
    with config.unlocked():
        config.seed = config.seed + 1
    loop.write_run_config(config, str(tmp_path / "fresh"))
    assert loop.read_run_config(str(tmp_path / "fresh")) == first

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    whole = (tmp_path / "fresh" / loop.RUN_CONFIG).read_text()
    (damaged / loop.RUN_CONFIG).write_text(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        loop.read_run_config(str(damaged))
    line = assert_one_line_error(
        run_cli("--config", "configs/sfbd_smoke.py", "--workdir", str(damaged),
                "--config.mode=edm", "--config.train.total_images=64"),
        str(damaged / loop.RUN_CONFIG), "not valid JSON")
    assert "mend or remove it" in line
    assert (damaged / loop.RUN_CONFIG).read_text() == whole[: len(whole) // 2]
