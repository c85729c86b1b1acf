"""Data sources: tfds (on tfds mock data), image folders, the embedded set; batches."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tiny_config
from PIL import Image

from sfbd_jax.data import pipeline, sources
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.utils import devices


def tfds_config(name, size, channels, crop=0):
    c = tiny_config(image_size=size, channels=channels).data
    c.source, c.tfds_name, c.split, c.center_crop = "tfds", name, "train", crop
    c.data_dir = "/nonexistent/tfds"
    return c


def test_tfds_cifar10_on_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        data = sources.load_source(tfds_config("cifar10", 32, 3))
    assert data.images.shape == (12, 32, 32, 3) and data.images.dtype == np.float32
    assert -1.0 <= data.images.min() and data.images.max() <= 1.0
    assert data.num_classes == 10 and data.labels.shape == (12,)


def test_tfds_celeba_cropped_and_resized_to_64():
    with tfds.testing.mock_data(num_examples=3):
        data = sources.load_source(tfds_config("celeb_a", 64, 3, crop=140))
    assert data.images.shape == (3, 64, 64, 3)
    assert data.labels is None


def test_tfds_mnist_resized_to_32():
    with tfds.testing.mock_data(num_examples=4):
        data = sources.load_source(tfds_config("mnist", 32, 1))
    assert data.images.shape == (4, 32, 32, 1) and data.num_classes == 10


def test_missing_tfds_data_fails_fast_with_instructions():
    t = time.time()
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar10"):
        sources.load_source(tfds_config("cifar10", 32, 3))
    assert time.time() - t < 30
    with pytest.raises(FileNotFoundError, match="no data set"):
        sources.load_source(tfds_config("no_such_dataset_xyz", 32, 3))


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(tmp_path / f"{i}.png")
    c = tiny_config(image_size=16, channels=3).data
    c.source, c.folder = "folder", str(tmp_path)
    data = sources.load_source(c)
    assert data.images.shape == (3, 16, 16, 3)
    c.folder = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.load_source(c)


def test_image_folder_of_mixed_sizes_and_unreadable_files(tmp_path):
    """Photos as they come: every image is centre-cropped to a square and resized before shapes
    are compared; unreadable files are all named at once, refused or skipped per config."""
    rng = np.random.default_rng(0)
    sizes = [(20, 20), (40, 24), (17, 31), (64, 64)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(tmp_path / f"{i}.png")
    c = tiny_config(image_size=16, channels=3).data
    c.source, c.folder = "folder", str(tmp_path)
    data = sources.load_source(c)
    assert data.images.shape == (4, 16, 16, 3)
    # A 40×24 image: its centred 24×24 square (rows 8..32), resized to 16×16.
    tall = np.asarray(Image.open(tmp_path / "1.png"))[8:32]
    expected = sources.resize_images(tall[None], 16)[0]
    np.testing.assert_array_equal(data.images[1], sources.uint8_to_unit_range(expected))
    (tmp_path / "broken_a.png").write_bytes(b"not an image")
    (tmp_path / "broken_b.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=r"2 of 6 image files.*broken_a\.png.*broken_b\.jpg"
                                         r".*unreadable_files='skip'"):
        sources.load_source(c)
    c.unreadable_files = "skip"
    assert sources.load_source(c).images.shape == (4, 16, 16, 3)


def test_batches_are_a_function_of_seed_and_step():
    indexer = pipeline.BatchIndexer(10, 4, seed=3)
    first = [indexer.indices(s) for s in range(5)]
    again = pipeline.BatchIndexer(10, 4, seed=3)
    for s in (4, 0, 2):  # any order: resumable from a step count
        np.testing.assert_array_equal(again.indices(s), first[s])
    # Every epoch is a permutation: steps 0..4 cover 20 positions = 2 epochs of 10.
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.repeat(np.arange(10), 2))
    assert not np.array_equal(pipeline.BatchIndexer(10, 4, seed=4).indices(0), first[0])


def test_random_flip_is_seeded_and_global(two_devices):
    images = np.random.default_rng(0).uniform(-1, 1, (8, 4, 4, 1)).astype(np.float32)
    data = ImageDataset(images, None, 0, "t")
    outs = []
    for n in (1, 2):
        b = pipeline.TrainBatches(data, 8, 1, 0, devices.make_data_mesh(n), 0,
                                  random_flip=True)
        outs.append(np.asarray(b.get(0)["image"]))
    np.testing.assert_array_equal(outs[0], outs[1])
    idx = pipeline.BatchIndexer(8, 8, 0).indices(0)
    flips = pipeline.flip_mask(0, 0, 8)
    assert 0 < flips.sum() < 8
    np.testing.assert_array_equal(outs[0][0][flips], images[idx][flips][:, :, ::-1])
    np.testing.assert_array_equal(outs[0][0][~flips], images[idx][~flips])
