"""The EDM run end to end on the embedded MNIST-5k data: outputs, resume, bit-exact continuation."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from sfbd_jax.data import sources
from sfbd_jax.run import run
from sfbd_jax.utils.checkpoints import CheckpointError


def mnist_config(total_images):
    c = tiny_config(image_size=28)
    c.model.attn_resolutions = (14,)
    c.train.total_images = total_images
    c.train.checkpoint_every_steps = 2
    c.train.async_checkpoints = True
    return c


def test_mnist5k_loads_as_real_digits():
    data = sources.load_mnist5k()
    assert data.images.shape == (5000, 28, 28, 1) and data.images.dtype == np.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(data.labels), [500] * 10)


def test_edm_run_writes_outputs_and_resumes_bit_exactly(tmp_path):
    interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    run(mnist_config(32), interrupted)  # 4 steps, then "killed"
    assert sorted(os.listdir(os.path.join(interrupted, "checkpoints"))) == ["2", "4"]
    with open(os.path.join(interrupted, "config.json")) as f:
        assert json.load(f)["seed"] == 0
    assert os.path.exists(os.path.join(interrupted, "samples", "final.png"))
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(interrupted))

    resumed = run(mnist_config(64), interrupted)  # re-run with the same workdir: continues
    uninterrupted = run(mnist_config(64), straight)
    assert int(resumed.step) == int(uninterrupted.step) == 8
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # A workdir whose checkpoint cannot be read stops with an error; the checkpoint stays.
    broken = str(tmp_path / "broken")
    shutil.copytree(interrupted, broken)
    for root, _, files in os.walk(os.path.join(broken, "checkpoints", "8")):
        for name in files:
            if name.startswith("manifest") or name.startswith("_METADATA"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoints/8"):
        run(mnist_config(96), broken)
    assert os.path.isdir(os.path.join(broken, "checkpoints", "8"))
