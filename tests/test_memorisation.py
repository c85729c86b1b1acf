"""Nearest-neighbour metrics: memorisation, precision/recall, density/coverage — against brute
force on small sets, closed cases, bounded memory, and through the Evaluator and the modes."""

import os
import tracemalloc

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from scipy.spatial.distance import cdist

from sfbd_jax.evaluation import neighbours


def _sets(seed=0, n=120, m=200, d=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d))


# ----- k nearest ---------------------------------------------------------------------------
@pytest.mark.parametrize("block", [1, 37, 1000, 10**7])
def test_k_nearest_matches_brute_force_at_any_block_size(block):
    q, r = _sets()
    dist, index = neighbours.k_nearest(q, r, 3, block_elements=block)
    full = cdist(q, r)
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :3], atol=1e-12)
    np.testing.assert_array_equal(index, np.argsort(full, axis=1)[:, :3])
    # Leave-one-out: a point never finds itself.
    dist, index = neighbours.k_nearest(r, r, 2, exclude_self=True, block_elements=block)
    full = cdist(r, r)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :2], atol=1e-12)
    np.testing.assert_array_equal(index, np.argsort(full, axis=1)[:, :2])
    assert not np.any(index == np.arange(len(r))[:, None])


def test_k_nearest_refuses_bad_input():
    q, r = _sets()
    with pytest.raises(ValueError, match="dimensions differ"):
        neighbours.k_nearest(q, r[:, :3], 1)
    with pytest.raises(ValueError, match="need at least 3 reference rows"):
        neighbours.k_nearest(q, r[:2], 3)
    with pytest.raises(FloatingPointError, match="NaN"):
        neighbours.k_nearest(np.full((2, 6), np.nan), r, 1)


def test_distance_blocks_keep_memory_bounded():
    """4,000 × 4,000 float64 distances would be 128 MB; with 2¹⁶-entry blocks the peak of
    NumPy allocations stays a small fraction of that."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))
    full_bytes = 4000 * 4000 * 8
    tracemalloc.start()
    neighbours.k_nearest(a, b, 2, block_elements=1 << 16)
    neighbours.manifold_metrics(a, b, block_elements=1 << 16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < full_bytes / 10, peak


# ----- memorisation ------------------------------------------------------------------------
def test_memorisation_matches_brute_force():
    rng = np.random.default_rng(2)
    train, held = rng.normal(size=(60, 5)), rng.normal(size=(40, 5))
    # Half the samples are near-copies of training images, half fresh.
    samples = np.concatenate([train[:25] + 0.01 * rng.normal(size=(25, 5)),
                              rng.normal(size=(25, 5))])
    mem = neighbours.memorisation(samples, train, held, block_elements=64)
    full = np.sort(cdist(samples, train), axis=1)
    np.testing.assert_allclose(mem.d1, full[:, 0], atol=1e-12)
    np.testing.assert_allclose(mem.d2, full[:, 1], atol=1e-12)
    np.testing.assert_array_equal(mem.nearest, np.argmin(cdist(samples, train), axis=1))
    summary = mem.summary()
    assert summary["memorised_fraction"] == pytest.approx(
        np.mean(full[:, 0] / full[:, 1] < 1 / 3))
    assert 0.5 <= summary["memorised_fraction"] < 0.75  # the 25 copies (+ chance)
    base = cdist(held, train).min(axis=1)
    assert summary["median_d1_heldout"] == pytest.approx(np.median(base))
    assert summary["d1_ratio"] == pytest.approx(np.median(full[:, 0]) / np.median(base))
    assert summary["heldout"] == "outside"
    loo = neighbours.memorisation(samples, train).summary()
    full_train = cdist(train, train)
    np.fill_diagonal(full_train, np.inf)
    assert loo["heldout"] == "leave_one_out"
    assert loo["median_d1_heldout"] == pytest.approx(np.median(full_train.min(axis=1)))
    assert set(mem.most_copied(3)) <= set(range(25))


def test_a_generator_that_returns_its_training_images_is_fully_memorised():
    rng = np.random.default_rng(3)
    train = rng.uniform(-1, 1, size=(50, 8, 8, 1))
    mem = neighbours.memorisation(train[rng.permutation(50)], train)
    summary = mem.summary()
    assert summary["memorised_fraction"] == 1.0
    assert summary["d1_ratio"] < 1e-6
    # Exact duplicates in the training set (d1 = d2 = 0) still count as copies.
    dup = np.concatenate([train, train[:5]])
    assert neighbours.memorisation(train[:5], dup).summary()["memorised_fraction"] == 1.0


def test_fresh_samples_of_the_data_distribution_are_not_memorised():
    """Gaussian data in 16-D: new draws sit as far from the training set as held-out real
    images do (ratio ≈ 1) and none is a copy."""
    rng = np.random.default_rng(4)
    train = rng.normal(size=(500, 16))
    fresh, held = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    summary = neighbours.memorisation(fresh, train, held).summary()
    assert summary["memorised_fraction"] < 0.01
    assert summary["d1_ratio"] == pytest.approx(1.0, abs=0.05)


def test_memorisation_refuses_too_small_training_sets_and_bad_thresholds():
    q, r = _sets()
    with pytest.raises(ValueError, match="at least 2 training images"):
        neighbours.memorisation(q, r[:1])
    with pytest.raises(ValueError, match="threshold"):
        neighbours.memorisation(q, r, threshold=0.0)


# ----- precision / recall / density / coverage ---------------------------------------------
def _brute_manifold(real, fake, pr_k, dc_k):
    rr = cdist(real, real)
    ff = cdist(fake, fake)
    fr = cdist(fake, real)
    r_pr = np.sort(rr, axis=1)[:, pr_k]  # column 0 is the point itself
    r_dc = np.sort(rr, axis=1)[:, dc_k]
    f_pr = np.sort(ff, axis=1)[:, pr_k]
    return {"precision": np.mean(np.any(fr <= r_pr[None], axis=1)),
            "recall": np.mean(np.any(fr.T <= f_pr[None], axis=1)),
            "density": np.sum(fr < r_dc[None]) / (dc_k * len(fake)),
            "coverage": np.mean(fr.min(axis=0) < r_dc)}


@pytest.mark.parametrize("block", [50, 10**7])
def test_manifold_metrics_match_brute_force(block):
    rng = np.random.default_rng(5)
    real = rng.normal(size=(150, 4))
    fake = rng.normal(loc=0.5, scale=0.8, size=(110, 4))
    got = neighbours.manifold_metrics(real, fake, pr_k=3, dc_k=5, block_elements=block)
    want = _brute_manifold(real, fake, 3, 5)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_manifold_metrics_closed_cases():
    rng = np.random.default_rng(6)
    real = rng.normal(size=(300, 5))
    same = neighbours.manifold_metrics(real, real.copy())
    assert same == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    far = neighbours.manifold_metrics(real, real + 1000.0)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # A generator that covers only part of the data: every sample is real-looking
    # (precision 1) but much of the data is missed (recall, coverage < 1).
    part = real[real[:, 0] > 0.5]
    sub = neighbours.manifold_metrics(real, part)
    assert sub["precision"] == 1.0
    assert sub["recall"] < 0.6 and sub["coverage"] < 0.6
    with pytest.raises(ValueError, match="need more than 5 real"):
        neighbours.manifold_metrics(real[:5], part)


# ----- through the Evaluator ---------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_evaluator(tmp_path_factory):
    """An Evaluator with the neighbour metrics on 500 MNIST digits (classifier features)."""
    from configs import default
    from sfbd_jax.data import sources
    from sfbd_jax.evaluation import evaluator
    from sfbd_jax.utils import devices

    data = sources.load_mnist5k()
    keep = np.arange(0, 5000, 10)
    reference = sources.ImageDataset(data.images[keep], data.labels[keep], 10, "mnist500")
    c = tiny_config(image_size=28)
    c.eval.metrics = "memorisation,precision_recall,density_coverage"
    c.eval.cache_dir = str(tmp_path_factory.mktemp("cache"))
    c.eval.batch_size = 50
    c.eval.copy_pairs = 4
    cfg = default.get_config().eval.classifier
    cfg.steps, cfg.batch_size, cfg.width, cfg.feature_dim, cfg.lr = 100, 32, 8, 16, 1e-2
    c.eval.classifier = cfg
    return evaluator.Evaluator(c, devices.make_data_mesh(), reference), reference


def test_evaluator_sees_a_copying_generator_and_not_an_honest_one(mnist_evaluator, tmp_path):
    from sfbd_jax.data import sources
    from sfbd_jax.evaluation.training_sets import TrainingImages

    ev, reference = mnist_evaluator
    train = TrainingImages(reference.images[:50], "first 50")
    copies = train.images[np.arange(200) % 50]  # a generator that only replays its 50
    png = str(tmp_path / "copies.png")
    copied = ev.evaluate(copies, train=train, copies_path=png)
    # Other real digits, none of them in the reference (a model that generalises perfectly).
    unseen = sources.load_mnist5k().images[5::10][:200]
    honest = ev.evaluate(unseen, train=train)
    assert ev.neighbour_space == "classifier" and "classifier_fd" not in copied
    assert copied["memorised_fraction_train_pixel"] == 1.0
    assert copied["memorised_fraction_train_features"] == 1.0
    assert copied["d1_ratio_train_pixel"] < 1e-3
    assert honest["memorised_fraction_train_pixel"] < 0.05
    assert honest["d1_ratio_train_pixel"] == pytest.approx(1.0, abs=0.15)
    # Nearer to the training images than to as many unseen ones: only the copier.
    assert copied["copy_ratio_train_pixel"] < 1e-3 and copied["copy_ratio_train_features"] < 1e-3
    assert honest["copy_ratio_train_pixel"] == pytest.approx(1.0, abs=0.15)
    # Blurred samples are worse, not copies. Blur shortens every pixel distance, so the d1
    # ratio against held-out real images drops as if the model copied; the copy ratio, whose
    # two distances are both from the samples, does not move.
    import scipy.ndimage

    blurred = scipy.ndimage.gaussian_filter(unseen, (0, 1.5, 1.5, 0))
    worse = ev.evaluate(blurred, train=train)
    assert worse["copy_ratio_train_pixel"] == pytest.approx(1.0, abs=0.15)
    assert worse["d1_ratio_train_pixel"] < honest["d1_ratio_train_pixel"] - 0.1
    # Against all 500 reference digits (leave-one-out baseline): the copies are in it too.
    assert copied["memorised_fraction_data_pixel"] == 1.0
    assert copied["heldout_data"] == "leave_one_out (500)"
    assert copied["heldout_train"] == "outside (450)"
    assert copied["train_count"] == 50
    # The copier covers a tenth of the data: precise, little recall and coverage.
    assert copied["prdc_counts"] == [200, 200]  # equal real and generated counts
    assert copied["precision"] > 0.9 and copied["recall"] < 0.3 and copied["coverage"] < 0.5
    assert honest["recall"] > copied["recall"] and honest["coverage"] > copied["coverage"]
    # The PNG pairs the most-copied samples (top) with their nearest training images.
    with Image.open(png) as img:
        grid = np.asarray(img)
    assert grid.shape == (2 * 29 + 1, 4 * 29 + 1)
    np.testing.assert_array_equal(grid[1:29, 1:29], grid[30:58, 1:29])
    best = copied["most_copied_train"]
    np.testing.assert_array_equal(copies[best["sample"]], train.images[best["neighbour"]])


def test_evaluator_training_set_equal_to_the_reference_is_measured_once(mnist_evaluator):
    from sfbd_jax.evaluation.training_sets import TrainingImages

    ev, reference = mnist_evaluator
    out = ev.evaluate(reference.images[:100],
                      train=TrainingImages(reference.images, "all 500"))
    for key in ("memorised_fraction", "median_d1", "d1_ratio"):
        for space in ("pixel", "features"):
            assert out[f"{key}_train_{space}"] == out[f"{key}_data_{space}"]
    assert "copy_ratio_train_pixel" not in out  # no unseen real images to compare with
    assert out["memorised_fraction_train_pixel"] == 1.0
    with pytest.raises(ValueError, match="at least 2 training images"):
        ev.evaluate(reference.images[:10], train=TrainingImages(reference.images[:1], "one"))


# ----- the training set of each mode -------------------------------------------------------
def test_each_mode_names_the_clean_images_it_trained_on(tmp_path):
    from sfbd_jax.data import eval_only, prepare, sources
    from sfbd_jax.data.prepared import PreparedDataset
    from sfbd_jax.evaluation.training_sets import run_training_images
    from sfbd_jax.training import loop

    c = tiny_config(image_size=28)
    c.data.subset = 120
    c.corrupt.clean_count = 20
    source = sources.load_source(c.data)
    workdir = str(tmp_path)
    edm = run_training_images(c, workdir)  # the oracle: the whole clean data set
    np.testing.assert_array_equal(edm.images, source.images)

    for mode in ("sfbd", "ambient"):
        c.mode = mode
        prepare.prepare(prepare.with_output_dir(c, workdir))
        clean = PreparedDataset(os.path.join(workdir, "data")).clean()
        np.testing.assert_array_equal(run_training_images(c, workdir).images, clean.images)
        assert len(clean) == 20

    c.mode, c.data.use_prepared = "edm", True
    np.testing.assert_array_equal(run_training_images(c, workdir).images, clean.images)
    c.data.prepared_group = "noisy"  # EDM on the corrupted set: its originals + the clean
    originals = eval_only.load_clean_originals(os.path.join(workdir, "data"))
    got = run_training_images(c, workdir)
    np.testing.assert_array_equal(got.images, np.concatenate([originals, clean.images]))
    assert len(got) == 120
    # ... and mode=edm trains on exactly those images, corrupted and clipped.
    noisy, _ = PreparedDataset(os.path.join(workdir, "data")).noisy()
    trained = loop.edm_dataset(c, workdir)
    read = trained.images.all_rows()  # read by index from the shards, not held in memory
    np.testing.assert_array_equal(read, np.concatenate(
        [np.clip(noisy.images, -1, 1), clean.images]))
    assert read.min() >= -1 and trained.name == "noisy+clean"
