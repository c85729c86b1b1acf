"""Orbax save → restore is bit-exact; unreadable checkpoints raise and are never deleted."""

import os

import jax
import numpy as np
import pytest
from conftest import tiny_config
from test_training import run_steps

from sfbd_jax.utils import devices
from sfbd_jax.utils.checkpoints import Checkpointer, CheckpointError


@pytest.fixture(scope="module")
def trained():
    return run_steps(tiny_config(), devices.make_data_mesh(1), 2)


def test_save_restore_is_bit_exact_with_optimizer_state_types(tmp_path, trained):
    exp, state = trained
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, enable_async=True)
    ckpt.save(2, state)
    ckpt.close()  # waits for the asynchronous save

    restored = Checkpointer(str(tmp_path / "ckpt")).restore_latest(exp.abstract_state())
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # NamedTuple types too
    assert type(restored.opt_state) is type(state.opt_state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored.step) == 2 and int(restored.images_seen) == 16


def test_keeps_a_configurable_number(tmp_path, trained):
    _, state = trained
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, enable_async=False)
    for step in (1, 2, 3):
        ckpt.save(step, state)
    ckpt.close()
    assert Checkpointer(str(tmp_path / "ckpt")).all_steps() == [2, 3]


def test_corrupt_checkpoint_raises_a_clear_error_and_stays(tmp_path, trained):
    exp, state = trained
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(str(directory), enable_async=False)
    ckpt.save(2, state)
    ckpt.close()
    # Truncate every data file of the checkpoint.
    damaged = 0
    for root, _, files in os.walk(directory / "2"):
        for name in files:
            if name.startswith("_CHECKPOINT") or name == "commit_success.txt":
                continue
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(3)
            damaged += 1
    assert damaged
    before = sorted(os.listdir(directory / "2"))
    with pytest.raises(CheckpointError, match=str(directory / "2")):
        Checkpointer(str(directory)).restore_latest(exp.abstract_state())
    assert sorted(os.listdir(directory / "2")) == before  # nothing deleted
    # A fresh experiment resuming from this directory reports the same error.
    with pytest.raises(CheckpointError, match="left in place"):
        exp.restore_or_init(Checkpointer(str(directory)))
