"""Input overlapped with compute: prefetched batches are the batches, errors surface where the
batch was wanted, and no thread outlives its phase."""

import threading

import jax
import numpy as np
import pytest
from conftest import tiny_config
from test_training import tiny_dataset

from sfbd_jax.data import pipeline, rows, shards
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.training.loop import Experiment
from sfbd_jax.utils import devices
from sfbd_jax.utils.checkpoints import Checkpointer


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == pipeline.Prefetcher.THREAD_NAME]


class _Writer:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars[step] = scalars


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_are_the_batches(depth):
    mesh = devices.make_data_mesh(1)
    batches = pipeline.TrainBatches(tiny_dataset(), 8, 2, 5, mesh, 2, random_flip=True)
    with pipeline.Prefetcher(batches.get, range(0, 20, 2), depth) as source:
        for first in range(0, 20, 2):
            got, want = source.get(first), batches.get(first)
            for name in ("image", "label"):
                np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
        assert source.wait_seconds >= 0.0
    assert not _prefetch_threads()


def test_out_of_order_and_early_close():
    made = []
    source = pipeline.Prefetcher(lambda s: made.append(s) or {"s": s}, range(100), 2)
    assert source.get(0) == {"s": 0}
    with pytest.raises(RuntimeError, match="step 1, asked for 5"):
        source.get(5)
    source.close()  # a producer blocked on a full queue is stopped, not left waiting
    assert not _prefetch_threads() and len(made) < 10
    with pytest.raises(ValueError, match=">= 0"):
        pipeline.Prefetcher(lambda s: {}, range(3), -1)


def test_an_error_while_gathering_is_raised_by_the_get_that_wanted_the_batch():
    def produce(step):
        if step == 3:
            raise OSError("disk gone")
        return {"s": step}

    with pipeline.Prefetcher(produce, range(10), 4) as source:
        assert [source.get(s)["s"] for s in range(3)] == [0, 1, 2]
        with pytest.raises(OSError, match="disk gone"):
            source.get(3)
    assert not _prefetch_threads()


def _train(config, dataset, tmp_path, name):
    exp = Experiment(config, devices.make_data_mesh(1))
    ckpt = Checkpointer(str(tmp_path / name), enable_async=False)
    writer = _Writer()
    try:
        state = exp.train(exp.init_state(), dataset, end_step=8, phase_start_step=0,
                          data_seed=0, checkpointer=ckpt, writer=writer,
                          workdir=str(tmp_path / name))
    finally:
        ckpt.close()
    return state, writer


def test_training_with_and_without_prefetch_is_bit_identical(tmp_path):
    """The same parameters whether batches come from the thread or are gathered in line, from
    a set read by index (memory-mapped shards, uint8 pixels decoded per batch)."""
    data = tiny_dataset()
    pixels = np.rint((data.images + 1.0) * 127.5).astype(np.uint8)
    entries = [shards.write_shard(str(tmp_path), f"s/{i}.npy", pixels[i:i + 10])
               for i in range(0, 32, 10)]
    mapped = ImageDataset(shards.ShardedArray(str(tmp_path), entries), None, 0, "mapped")
    results = {}
    for depth in (0, 2):
        config = tiny_config()
        config.train.prefetch_dispatches = depth
        results[depth] = _train(config, mapped, tmp_path, f"d{depth}")
    for a, b in zip(jax.tree_util.tree_leaves(results[0][0].params),
                    jax.tree_util.tree_leaves(results[2][0].params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fractions = [s["train/input_wait_fraction"] for s in results[2][1].scalars.values()]
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions)
    assert not _prefetch_threads()


def test_a_corrupt_row_read_ahead_fails_the_run_and_leaves_no_thread(tmp_path):
    """A NaN row of a memory-mapped shard (its checksum not verified on opening) is found by
    the prefetch thread; the error names the shard and reaches the training loop."""
    data = tiny_dataset()
    bad = data.images.copy()
    bad[17, 0, 0, 0] = np.nan
    entries = [shards.write_shard(str(tmp_path), "s/0.npy", bad)]
    mapped = shards.ShardedArray(str(tmp_path), entries, verify=False)
    union = rows.ConcatenatedRows([mapped], name="poisoned")
    config = tiny_config()
    config.train.prefetch_dispatches = 3
    with pytest.raises(shards.CorruptShardError, match=r"s/0.npy holds NaN .* 17"):
        _train(config, ImageDataset(union, None, 0, "poisoned"), tmp_path, "run")
    assert not _prefetch_threads()
