"""The index-level union of SFBD's forward step: the same rows, batches and diagnostics as
the concatenated in-memory set, without the copy."""

import numpy as np
import pytest

from sfbd_jax.data import pipeline, rows, shards
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.evaluation import denoising
from sfbd_jax.utils import devices


def _parts(tmp_path):
    rng = np.random.default_rng(0)
    denoised = rng.normal(0.0, 0.8, (13, 4, 4, 1)).astype(np.float32)  # overshoots [-1, 1]
    entries = [shards.write_shard(str(tmp_path), f"d/{i}.npy", denoised[i:i + 5])
               for i in range(0, 13, 5)]
    mapped = shards.ShardedArray(str(tmp_path), entries)
    clean = rng.uniform(-1.0, 1.0, (6, 4, 4, 1)).astype(np.float32)
    in_memory = np.concatenate([np.clip(denoised, -1.0, 1.0), clean, clean])
    union = rows.ConcatenatedRows([mapped, clean, clean], [rows.clip_to_image_range, None, None])
    return union, in_memory, denoised


def test_union_reads_the_rows_of_the_concatenation(tmp_path):
    union, in_memory, _ = _parts(tmp_path)
    assert union.shape == in_memory.shape and len(union) == 25 and union.dtype == np.float32
    index = np.random.default_rng(1).integers(0, 25, (3, 7))
    np.testing.assert_array_equal(union[index], in_memory[index])
    np.testing.assert_array_equal(union[np.arange(25)], in_memory)
    with pytest.raises(IndexError, match="out of range for 25 rows"):
        union[np.array([25])]
    with pytest.raises(TypeError, match="integer array"):
        union[np.array([0.5])]
    with pytest.raises(ValueError, match="differ in shape"):
        rows.ConcatenatedRows([np.zeros((2, 4, 4, 1)), np.zeros((2, 4, 4, 3))])


@pytest.mark.parametrize("num_devices", [1, 2])
def test_batches_of_the_union_equal_those_of_the_in_memory_set(tmp_path, num_devices):
    union, in_memory, _ = _parts(tmp_path)
    labels = np.arange(25, dtype=np.int32) % 3
    mesh = devices.make_data_mesh(num_devices)
    lazy = pipeline.TrainBatches(ImageDataset(union, labels, 3, "union"), 4, 2, 7, mesh, 3, True)
    eager = pipeline.TrainBatches(ImageDataset(in_memory, labels, 3, "mem"), 4, 2, 7, mesh, 3,
                                  True)
    for step in (0, 2, 10, 24):  # across epochs of the 25-row set
        a, b = lazy.get(step), eager.get(step)
        for name in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_denoising_diagnostics_stream_in_chunks(tmp_path, monkeypatch):
    union, _, denoised = _parts(tmp_path)
    originals = np.random.default_rng(2).uniform(-1, 1, denoised.shape).astype(np.float32)
    from sfbd_jax.data import eval_only

    monkeypatch.setattr(eval_only, "load_clean_originals", lambda d, lazy=False: originals)
    mapped = union.parts[0]
    quality = denoising.against_originals("unused", mapped, rows_per_chunk=3)
    mse, psnr = denoising.mse_psnr(np.clip(denoised, -1, 1), originals)
    assert quality["mse"] == pytest.approx(mse, rel=1e-12)
    assert quality["psnr"] == pytest.approx(psnr, rel=1e-12)
    assert quality["clipped_fraction"] == np.mean(np.abs(denoised) > 1.0) > 0
    with pytest.raises(ValueError, match="shapes differ"):
        denoising.against_originals("unused", mapped[np.arange(5)])
