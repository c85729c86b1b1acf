"""Evaluation: distances against direct computations, the Inception port and its weight files,
the cached feature classifier, and evaluating a checkpoint from the command line."""

import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from conftest import flip_bytes, tiny_config

from sfbd_jax.data import sources
from sfbd_jax.evaluation import (
    classifier,
    distances,
    evaluator,
    inception,
    noise_level,
    torch_pickle,
)

DATA = os.path.join(os.path.dirname(__file__), "data")


# ----- distances -------------------------------------------------------------------------
def test_feature_stats_match_numpy_in_batches():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(301, 7)) @ rng.normal(size=(7, 7)) + 3.0
    stats = distances.FeatureStats(7)
    for chunk in np.array_split(feats, 5):
        stats.update(chunk.astype(np.float32))
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, feats.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(cov, np.cov(feats.astype(np.float32), rowvar=False), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        stats.update(feats[:, :3])
    with pytest.raises(FloatingPointError):
        stats.update(np.full((2, 7), np.nan))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    for dim in (1, 5, 64):
        a = rng.normal(size=(4 * dim, dim))
        b = rng.normal(size=(4 * dim, dim)) * 1.7 + 0.3
        mu1, mu2 = a.mean(0), b.mean(0)
        c1, c2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
        direct = (np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
                  - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real))
        assert distances.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(direct, rel=1e-8)
    assert distances.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-8)
    # Two Gaussians with known closed form: diag covariances → Σ (√s1 − √s2)².
    s1, s2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    expected = 1.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = distances.frechet_distance(np.zeros(2), np.diag(s1), np.array([1.0, 0]), np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="mismatched"):
        distances.frechet_distance(mu1, c1, mu1[:2], c1[:2, :2])


def _mmd2_direct(x, y):
    k = lambda a, b: (a @ b / x.shape[1] + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_matches_direct_unbiased_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 0.5
    # Subsets as large as the sets: every subset is a permutation, so the MMD² is exact.
    mean, std = distances.kernel_inception_distance(x, y, num_subsets=3, subset_size=30)
    assert mean == pytest.approx(_mmd2_direct(x, y), rel=1e-10) and std < 1e-12
    # Same distribution: the unbiased estimate scatters around 0.
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    mean, std = distances.kernel_inception_distance(a, b, num_subsets=20, subset_size=100)
    assert abs(mean) < 3 * std + 1e-3


def test_sliced_wasserstein_matches_scipy_in_1d_and_per_direction():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(37, 1)), rng.exponential(size=(53, 1))
    assert distances.sliced_wasserstein(x, y, num_projections=4) == pytest.approx(
        scipy.stats.wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-10)
    # In D dimensions: the mean of scipy's W1 over the same directions.
    x, y = rng.normal(size=(40, 3, 2)), rng.normal(size=(25, 3, 2)) * 2
    theta = np.random.default_rng(7).standard_normal((6, 9))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    direct = np.mean([scipy.stats.wasserstein_distance(x.reshape(40, -1) @ t,
                                                       y.reshape(25, -1) @ t) for t in theta.T])
    got = distances.sliced_wasserstein(x, y, num_projections=9, seed=7)
    assert got == pytest.approx(direct, rel=1e-10)
    assert distances.sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-12)


def test_noise_estimate_is_sigma_on_piecewise_linear_images_and_zero_on_clean_digits():
    """Planes a + b·i + c·j (and constants) have no Haar diagonal detail, so white noise of σ
    added to them is estimated at σ (the MAD of N(0, σ²) ÷ 0.6745) up to sampling error; clean
    MNIST digits (flat background) read exactly 0, and with noise their estimate grows with σ,
    above σ by the documented stroke bias."""
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(28.0), np.arange(28.0), indexing="ij")
    a, b, c = (rng.uniform(-1, 1, (400, 1, 1)) for _ in range(3))
    planes = (a + b * i / 28 + c * j / 28)[..., None]
    assert np.all(noise_level.haar_diagonal(planes) == pytest.approx(0.0, abs=1e-12))
    for sigma in (0.05, 0.2, 0.59):
        noisy = planes + sigma * rng.standard_normal(planes.shape)
        estimate = noise_level.noise_sigma(noisy)
        assert estimate.shape == (400,)
        # One image: 196 coefficients, the MAD's standard error ≈ 1.17σ/√196 ≈ 0.084σ; the
        # mean of 400: ≈ 0.004σ (4 of them: 1.7%); the median's small-sample bias < 1%.
        assert np.mean(estimate) == pytest.approx(sigma, rel=0.025)
        assert 0.05 < np.std(estimate) / sigma < 0.12
    digits = sources.load_mnist5k().images[::25].astype(np.float64)  # 200 digits
    assert np.all(noise_level.noise_sigma(digits) == 0.0)
    means = [np.mean(noise_level.noise_sigma(digits + s * rng.standard_normal(digits.shape)))
             for s in (0.05, 0.2, 0.59)]
    assert means[0] < means[1] < means[2]
    ratios = [m / s for m, s in zip(means, (0.05, 0.2, 0.59), strict=True)]
    assert 1.5 > ratios[0] > ratios[1] > ratios[2] > 1.0  # the strokes' bias, fading with σ
    assert ratios[1] == pytest.approx(1.14, abs=0.05)  # as the module docstring says
    # Clipping to [-1, 1] halves the noise on the background at -1: it reads lower.
    clipped = np.clip(digits + 0.2 * rng.standard_normal(digits.shape), -1, 1)
    assert 0.6 < np.mean(noise_level.noise_sigma(clipped)) / 0.2 < 0.8


def test_noise_estimate_pools_channels_drops_an_odd_edge_and_refuses_bad_input():
    rng = np.random.default_rng(1)
    x = 0.3 * rng.standard_normal((50, 29, 27, 3))
    got = noise_level.noise_sigma(x, chunk=7)
    coefficients = noise_level.haar_diagonal(x)
    assert coefficients.shape == (50, 14, 13, 3)
    direct = np.median(np.abs(coefficients.reshape(50, -1)), axis=1) / 0.6744897501960817
    np.testing.assert_allclose(got, direct, rtol=1e-12)  # chunks change nothing
    assert np.mean(got) == pytest.approx(0.3, rel=0.03)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        noise_level.noise_sigma(x[0])
    with pytest.raises(ValueError, match="no 2×2 block"):
        noise_level.noise_sigma(x[:, :1])
    x[3, 4, 5, 0] = np.nan
    with pytest.raises(FloatingPointError, match="NaN"):
        noise_level.noise_sigma(x)
    assert noise_level.noise_sigma(x[:0]).shape == (0,)


def test_evaluator_noise_metric_reads_zero_on_clean_digits_and_sigma_sized_on_noisy(tmp_path):
    """The 'noise' metric: ~0 on the clean reference, σ-sized on noisy copies; the reference's
    own value is reported beside it."""
    from sfbd_jax.utils import devices

    data = sources.load_mnist5k()
    reference = sources.ImageDataset(data.images[::10], data.labels[::10], 10, "mnist500")
    c = tiny_config(image_size=28)
    c.eval.metrics, c.eval.cache_dir, c.eval.swd_projections = "swd,noise", str(tmp_path), 64
    ev = evaluator.Evaluator(c, devices.make_data_mesh(), reference)
    clean = ev.evaluate(reference.images)
    rng = np.random.default_rng(0)
    noisy = ev.evaluate(np.clip(reference.images + 0.2 * rng.standard_normal(
        reference.images.shape), -1, 1))
    assert clean["noise_sigma"] == 0.0 and clean["noise_sigma_reference"] == 0.0
    assert noisy["noise_sigma_reference"] == 0.0
    assert 0.12 < noisy["noise_sigma"] < 0.16  # clipped σ = 0.2 noise (see noise_level)
    assert clean["swd"] == pytest.approx(0.0, abs=1e-12) and noisy["swd"] > 0
    from sfbd_jax.evaluation import report

    assert "residual noise" in report.summary_text(noisy, "t")


# ----- Inception and its weights ---------------------------------------------------------
def test_torch_files_of_both_formats_read_without_torch():
    expected = np.load(os.path.join(DATA, "state_expected.npz"))
    for name in ("state_zip.pt", "state_legacy.pt"):
        got = torch_pickle.load_state_dict(os.path.join(DATA, name))
        assert sorted(got) == sorted(expected.files)
        for key in expected.files:  # incl. a transposed view, an offset view, float16, int64
            assert got[key].dtype == expected[key].dtype
            np.testing.assert_array_equal(got[key], expected[key])


def test_torch_reader_refuses_foreign_classes_and_garbage(tmp_path):
    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(os.system))  # a pickle that would call a function
    with pytest.raises(ValueError, match="cannot read the torch file|neither"):
        torch_pickle.load_state_dict(str(evil))


def _torch_style_state_dict(variables):
    """The inverse of the converter: variables → pytorch-fid's names and layouts."""
    from flax import traverse_util

    names = {("params", "kernel"): "conv.weight", ("params", "scale"): "bn.weight",
             ("params", "bias"): "bn.bias", ("batch_stats", "mean"): "bn.running_mean",
             ("batch_stats", "var"): "bn.running_var"}
    out = {"fc.weight": np.zeros((1008, 2048)), "fc.bias": np.zeros(1008)}
    for key, value in traverse_util.flatten_dict(variables).items():
        value = np.asarray(value)
        name = ".".join(key[1:-2]) + "." + names[(key[0], key[-1])]
        out[name] = value.transpose(3, 2, 0, 1) if key[-1] == "kernel" else value
        if key[-1] == "mean":
            out[name.replace("running_mean", "num_batches_tracked")] = np.array(0)
    return out


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    variables = inception.random_variables(seed=0)
    path = str(tmp_path_factory.mktemp("inception") / "random.npz")
    inception.save_variables(variables, path)
    return variables, path


def test_inception_converter_and_weight_file_errors(random_inception, tmp_path):
    variables, path = random_inception
    state = _torch_style_state_dict(variables)
    converted = inception.convert_state_dict(state)
    from flax import traverse_util

    flat_a, flat_b = (traverse_util.flatten_dict(v) for v in (variables, converted))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])
    loaded = traverse_util.flatten_dict(inception.load_variables(path))
    assert all(np.array_equal(loaded[k], flat_a[k]) for k in flat_a)

    del state["Mixed_6b.branch1x1.bn.running_var"]
    with pytest.raises(KeyError, match="Mixed_6b/branch1x1/bn/var"):
        inception.convert_state_dict(state)
    with pytest.raises(FileNotFoundError, match="config.eval.inception_weights"):
        inception.load_variables("")
    with pytest.raises(FileNotFoundError, match="does-not-exist.npz.*convert"):
        inception.load_variables(str(tmp_path / "does-not-exist.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        inception.load_variables(str(bad))


def test_fid_and_kid_pipeline_with_random_inception_weights(random_inception, tmp_path):
    _, path = random_inception
    c = tiny_config(image_size=16, channels=3)
    c.eval.metrics = "fid,kid,swd"
    c.eval.inception_weights = path
    c.eval.cache_dir = str(tmp_path / "cache")
    c.eval.batch_size = 8
    c.eval.kid_subset_size = 10
    c.eval.kid_subsets = 5
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.uniform(-1, 1, (24, 4, 4, 3)), np.ones((1, 4, 4, 1)))
    reference = sources.ImageDataset(smooth.astype(np.float32), None, 0, "smooth")
    from sfbd_jax.utils import devices

    ev = evaluator.Evaluator(c, devices.make_data_mesh(), reference)
    same = ev.evaluate(reference.images)
    noise = ev.evaluate(rng.uniform(-1, 1, reference.images.shape))
    assert same["fid"] == pytest.approx(0.0, abs=1e-3) and same["swd"] == pytest.approx(0.0)
    assert noise["fid"] > 10 * max(same["fid"], 1e-3) and noise["kid"] > same["kid"]
    assert noise["swd"] > 0.1
    cached = sorted(os.listdir(os.path.join(c.eval.cache_dir, "reference")))
    assert len(cached) == 2 and cached[0].startswith("inception-")
    assert cached[1] == cached[0] + ".sha256"  # its integrity side-car
    # Flipped bytes in the cached statistics are caught before they are used.
    flip_bytes(os.path.join(c.eval.cache_dir, "reference", cached[0]))
    with pytest.raises(ValueError, match="does not match its checksum"):
        evaluator.Evaluator(c, devices.make_data_mesh(), reference).evaluate(reference.images)


# ----- feature classifier ----------------------------------------------------------------
def _classifier_config():
    from configs import default

    cfg = default.get_config().eval.classifier
    cfg.steps, cfg.batch_size, cfg.width, cfg.feature_dim, cfg.lr = 300, 32, 8, 16, 1e-2
    return cfg


@pytest.mark.slow  # end to end, ~25-30 s: keeps the everyday suite well under 15 min
def test_classifier_is_trained_once_then_loaded_from_cache(tmp_path):
    data = sources.load_mnist5k()
    keep = np.arange(0, 5000, 10)
    subset = sources.ImageDataset(data.images[keep], data.labels[keep], 10, "mnist500")
    cfg = _classifier_config()
    first = classifier.load_or_train(cfg, subset, str(tmp_path))
    assert first.meta["cached"] is False and 0.0 <= first.meta["test_accuracy"] <= 1.0
    assert first.meta["test_accuracy"] > 0.3  # 300 tiny steps: far above chance (0.1)
    again = classifier.load_or_train(cfg, subset, str(tmp_path))
    assert again.meta["cached"] is True
    assert again.meta["test_accuracy"] == first.meta["test_accuracy"]
    np.testing.assert_array_equal(again.features(subset.images[:5]),
                                  first.features(subset.images[:5]))
    cfg.seed = 1  # another setting → another cache entry
    assert classifier.load_or_train(cfg, subset, str(tmp_path)).meta["cached"] is False
    assert len(os.listdir(tmp_path / "classifier")) == 2
    # A second run that trained the same classifier meanwhile keeps the first copy, and no
    # staging directory is left behind (runs sharing a cache never see half a classifier).
    cached_dir = str(tmp_path / "classifier" / classifier.fingerprint(cfg, subset))
    before = open(os.path.join(cached_dir, "params.msgpack"), "rb").read()
    classifier._write_cache(cached_dir, first)
    assert open(os.path.join(cached_dir, "params.msgpack"), "rb").read() == before
    assert len(os.listdir(tmp_path / "classifier")) == 2
    os.remove(os.path.join(cached_dir, "meta.json"))  # a partial entry: named, not overwritten
    with pytest.raises(OSError, match="exists without meta.json"):
        classifier._write_cache(cached_dir, first)
    assert len(os.listdir(tmp_path / "classifier")) == 2
    shutil.rmtree(cached_dir)

    # A damaged cache is reported, not silently retrained over.
    cfg.seed = 0
    entry = tmp_path / "classifier" / classifier.fingerprint(cfg, subset) / "params.msgpack"
    flip_bytes(str(entry))  # still valid msgpack: only the integrity record sees it
    with pytest.raises(ValueError, match="params.msgpack: contents changed"):
        classifier.load_or_train(cfg, subset, str(tmp_path))
    entry.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="delete that directory"):
        classifier.load_or_train(cfg, subset, str(tmp_path))
    unlabelled = sources.ImageDataset(subset.images, None, 0, "nolabels")
    with pytest.raises(ValueError, match="needs a labelled data set"):
        classifier.train(cfg, unlabelled)


def test_per_class_classifier_fd_and_sample_accuracy(tmp_path):
    """Conditional samples: the per-class Fréchet distance of the reference digits given their
    own labels is 0; given wrong labels (every label moved to the next class) it is large."""
    from sfbd_jax.utils import devices

    data = sources.load_mnist5k()
    keep = np.arange(0, 5000, 10)
    reference = sources.ImageDataset(data.images[keep], data.labels[keep], 10, "mnist500")
    c = tiny_config(image_size=28)
    c.eval.metrics, c.eval.cache_dir, c.eval.batch_size = "classifier_fd", str(tmp_path), 50
    for key, value in _classifier_config().items():
        c.eval.classifier[key] = value
    ev = evaluator.Evaluator(c, devices.make_data_mesh(), reference)
    right = ev.evaluate(reference.images, reference.labels)
    wrong = ev.evaluate(reference.images, (reference.labels + 1) % 10)
    assert len(right["classifier_fd_per_class"]) == 10
    assert right["classifier_fd_class_mean"] == pytest.approx(0.0, abs=1e-6)
    assert right["classifier_fd"] == pytest.approx(0.0, abs=1e-6)
    assert wrong["classifier_fd_class_mean"] > 1.0
    assert wrong["classifier_fd"] == pytest.approx(0.0, abs=1e-6)  # overall: same images
    assert right["sample_class_accuracy"] > 0.3 > wrong["sample_class_accuracy"]
    # Features and classes come from one sharded pass; the classes are the classifier's own.
    clf = classifier.load_or_train(c.eval.classifier, reference, str(tmp_path))
    assert clf.meta["cached"] is True
    assert right["sample_class_accuracy"] == pytest.approx(
        float(np.mean(clf.predict(reference.images) == reference.labels)))
    unconditional = ev.evaluate(reference.images)
    assert "classifier_fd_per_class" not in unconditional
    # How many samples the classifier recognises (top probability ≥ 0.9), from the same pass.
    top = clf.probabilities(reference.images).max(axis=1)
    for result in (right, unconditional):
        assert result["classifier_confidence"] == pytest.approx(float(top.mean()), abs=1e-5)
        assert result["confident_fraction"] == pytest.approx(
            float(np.mean(top >= evaluator.CONFIDENT_PROBABILITY)), abs=1e-6)
    assert 0.0 < unconditional["confident_fraction"] < 1.0
