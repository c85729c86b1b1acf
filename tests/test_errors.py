"""Bad input gets a clear error naming the problem."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_config
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


def test_unknown_config_key_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sfbd_jax.main", "--config", "configs/mnist_edm.py",
         "--workdir", str(tmp_path), "--config.train.no_such_key=1"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr


def test_nan_loss_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="training loss is nan at step 7"):
        check_finite_loss(float("nan"), 7, checkpointer=_NoCheckpoint())


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
