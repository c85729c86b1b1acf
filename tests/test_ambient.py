"""Ambient Diffusion Omni: the eligibility rule, the ambient loss against a closed-form
Gaussian case, the annotation rule and the classifier's monotone annotations, annotations in
the manifest, and the mode=ambient run on a tiny folder data set."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flip_bytes, tiny_config
from PIL import Image

from sfbd_jax import corruptions
from sfbd_jax.data import annotations as annotations_lib
from sfbd_jax.data import eligibility, prepare
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.diffusion import edm
from sfbd_jax.methods import ambient, noise_classifier
from sfbd_jax.run import run
from sfbd_jax.training.step import edm_loss_fn
from sfbd_jax.utils import devices

SAFETY = np.sqrt(4.0 / 3.0)


# ----- eligibility ---------------------------------------------------------------------------
def mixed_annotations():
    """40 examples: 10 clean, 10 with σ_min 0.3, 10 with σ_min 2 and locality σ_max 0.05,
    5 with known noise σ_n = σ_min = 0.5, 5 never at high noise but σ_max = 0.2."""
    sigma_min = np.r_[np.zeros(10), np.full(10, 0.3), np.full(10, 2.0), np.full(5, 0.5),
                      np.full(5, np.inf)]
    sigma_max = np.r_[np.zeros(20), np.full(10, 0.05), np.zeros(5), np.full(5, 0.2)]
    sigma_n = np.r_[np.zeros(30), np.full(5, 0.5), np.zeros(5)]
    return eligibility.Annotations.make(sigma_min, sigma_max, sigma_n)


def test_every_drawn_example_is_eligible_at_its_sigma():
    ann = mixed_annotations()
    sampler = eligibility.EligibleSampler(ann, s_max=4.0, p_mean=-1.2, p_std=1.2)
    sigma, index = sampler.draw(np.random.default_rng(0), 200_000)
    high = sigma > ann.sigma_min[index] * SAFETY
    low = sigma < ann.sigma_max[index]
    assert np.all(high | low), "an example was drawn at a level its annotation forbids"
    noisy = ann.sigma_n[index] > 0
    assert np.all(sigma[noisy] > ann.sigma_n[index][noisy] * SAFETY * 0.9999)
    # Uniform among the eligible: at σ in (0.05, 0.2) exactly clean (10) + σ_max=0.2 (5) are.
    band = (sigma > 0.06) & (sigma < 0.19)
    counts = np.bincount(index[band], minlength=40)
    eligible = np.r_[np.arange(10), np.arange(35, 40)]
    assert counts.sum() == counts[eligible].sum()
    expected = band.sum() / 15
    assert np.all(np.abs(counts[eligible] - expected) < 5 * np.sqrt(expected))
    # Above every threshold, all 40 are drawn equally often.
    top = sigma > 2.0 * SAFETY
    counts = np.bincount(index[top], minlength=40)[:35]
    assert counts.min() > 0.8 * counts.mean()


def test_sigma_follows_the_training_distribution_when_all_are_clean():
    from scipy import stats

    ann = eligibility.Annotations.make(np.zeros(5))
    sigma, _ = eligibility.EligibleSampler(ann, 4.0, -1.2, 1.2).draw(
        np.random.default_rng(1), 20_000)
    assert stats.kstest(np.log(sigma), "norm", args=(-1.2, 1.2)).pvalue > 1e-3


def test_sigma_is_truncated_when_low_levels_have_no_example():
    ann = eligibility.Annotations.make(np.full(4, 0.3))  # no clean image at all
    sigma, _ = eligibility.EligibleSampler(ann, 4.0, -1.2, 1.2).draw(
        np.random.default_rng(2), 5_000)
    assert sigma.min() > 0.3 * SAFETY
    assert np.median(sigma) > np.exp(-1.2)  # the conditional distribution, not a clamp


def test_ambient_batches_never_train_below_sigma_min():
    """Through the sharded batch pipeline (2 devices): images encode their own index."""
    ann = mixed_annotations()
    n = len(ann)
    images = np.broadcast_to(((np.arange(n) + 0.5) / n * 2 - 1)[:, None, None, None],
                             (n, 4, 4, 1)).astype(np.float32)
    mesh = devices.make_data_mesh()
    batches = eligibility.AmbientBatches(
        ImageDataset(images, None, 0, "indexed"), ann, s_max=4.0, p_mean=-1.2, p_std=1.2,
        batch_size=64, steps_per_dispatch=2, seed=3, mesh=mesh, num_classes=0)
    for step in range(0, 40, 2):
        b = batches.get(step)
        assert set(b) == {"image", "sigma", "sigma_n"}
        index = np.floor((np.asarray(b["image"])[..., 0, 0, 0] + 1) / 2 * n).astype(int)
        sigma = np.asarray(b["sigma"])
        assert np.all((sigma > ann.sigma_min[index] * SAFETY) | (sigma < ann.sigma_max[index]))
        np.testing.assert_array_equal(np.asarray(b["sigma_n"]), ann.sigma_n[index])
    again = eligibility.AmbientBatches(
        ImageDataset(images, None, 0, "indexed"), ann, s_max=4.0, p_mean=-1.2, p_std=1.2,
        batch_size=64, steps_per_dispatch=2, seed=3, mesh=mesh, num_classes=0).get(38)
    np.testing.assert_array_equal(np.asarray(again["sigma"]), sigma)  # pure in (seed, step)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma_min=[0.1, np.nan]), "NaN"),
    (dict(sigma_min=[0.1, 0.2], sigma_n=[0.3, 0.0]), "below its own noise level"),
    (dict(sigma_min=[0.5, 0.2], sigma_n=[0.3, 0.0], sigma_max=[0.1, 0.0]), "sigma_max"),
    (dict(sigma_min=[0.1, -1.0]), "negative"),
])
def test_bad_annotations_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eligibility.Annotations.make(**kwargs)


def test_nothing_eligible_and_bad_s_max_are_refused():
    with pytest.raises(ValueError, match="no example is eligible"):
        eligibility.EligibleSampler(eligibility.Annotations.make(np.full(3, np.inf)), 4.0, 0, 1)
    with pytest.raises(ValueError, match="s_max must be > 1"):
        eligibility.safety_factor(1.0)


# ----- the ambient loss ----------------------------------------------------------------------
@pytest.mark.parametrize("sigma,sigma_n", [(0.8, 0.5), (1.5, 0.5), (0.7, 0.0)])
def test_ambient_loss_minimiser_is_the_clean_denoiser(sigma, sigma_n):
    """x ~ N(0, s²I), observed x_n = x + σ_n·ε. Over linear denoisers D(x_σ) = a·x_σ the ambient
    loss at σ is quadratic in a and minimised by the clean posterior mean s²/(s² + σ²)."""
    s, dim, batch = 0.6, 4, 200_000
    k_x, k_n, k_loss = jax.random.split(jax.random.PRNGKey(0), 3)
    x_n = (s * jax.random.normal(k_x, (batch, 1, 1, dim))
           + sigma_n * jax.random.normal(k_n, (batch, 1, 1, dim)))
    linear = lambda a, x, sig, labels, train, rng: a * x  # noqa: E731

    def loss(a):
        return jnp.mean(edm.ambient_loss_per_example(
            linear, a, x_n, jnp.full((batch,), sigma), jnp.full((batch,), sigma_n), k_loss,
            sigma_data=0.5))

    g, h = jax.grad(loss)(0.0), jax.grad(jax.grad(loss))(0.0)
    a_star = float(-g / h)
    assert a_star == pytest.approx(s**2 / (s**2 + sigma**2), abs=0.01)
    if sigma_n > 0:  # the naive target (the noisy images themselves) is measurably different
        naive = (s**2 + sigma_n**2) / (s**2 + sigma**2)
        assert abs(naive - s**2 / (s**2 + sigma**2)) > 0.05


def test_ambient_loss_with_no_known_noise_is_the_edm_loss():
    def denoise(params, x, sigma, labels=None, *, train=False, rng=None):
        return params * x

    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 1))
    sigma = jnp.linspace(0.1, 3.0, 6)
    key = jax.random.PRNGKey(2)
    ambient = edm.ambient_loss_per_example(denoise, 0.7, x, sigma, jnp.zeros(6), key,
                                           sigma_data=0.5)
    noise = jax.random.normal(jax.random.split(key)[0], x.shape)
    direct = edm.loss_weight(sigma, 0.5) * jnp.sum(
        (0.7 * (x + sigma[:, None, None, None] * noise) - x) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(ambient, direct, rtol=1e-5)
    # The train step's loss picks the ambient form when the batch carries σ.
    from types import SimpleNamespace

    fn = edm_loss_fn(denoise, SimpleNamespace(sigma_data=0.5, p_mean=-1.2, p_std=1.2))
    assert float(fn(0.7, {"image": x, "sigma": sigma}, key)) == pytest.approx(
        float(jnp.mean(direct)), rel=1e-5)


# ----- annotation --------------------------------------------------------------------------
def test_sigma_min_is_the_first_level_below_one_half_plus_epsilon():
    grid = np.array([0.1, 0.2, 0.4, 0.8, 1.6])
    probs = np.array([[0.99, 0.9, 0.52, 0.51, 0.5],    # crosses 0.55 at 0.4
                      [0.99, 0.99, 0.98, 0.9, 0.8],    # never: the largest level
                      [0.5, 0.5, 0.5, 0.5, 0.5],       # clean-looking: the smallest
                      [0.99, 0.4, 0.99, 0.99, 0.5]])   # a one-level dip
    raw = noise_classifier.sigma_min_from_probabilities(probs, grid, 0.05, window=1)
    np.testing.assert_allclose(raw, [0.4, 1.6, 0.1, 0.2])
    smoothed = noise_classifier.sigma_min_from_probabilities(probs, grid, 0.05, window=3)
    assert smoothed[3] == 1.6  # smoothing removes the dip
    assert smoothed[0] == 0.8  # (0.9 + 0.52 + 0.51)/3 > 0.55 at 0.4
    with pytest.raises(ValueError, match="smooth_window"):
        noise_classifier.sigma_min_from_probabilities(probs, grid, 0.05, window=2)


def classifier_config(image_size=16):
    c = tiny_config(image_size=image_size)
    c.ambient.classifier.base_channels = 8
    c.ambient.classifier.channel_mult = (1, 2)
    c.ambient.classifier.channels_per_head = 8
    c.ambient.classifier.batch_size = 64
    c.ambient.classifier.steps = 200
    c.ambient.classifier.lr = 2e-3
    c.ambient.classifier.log_every_steps = 100
    c.ambient.annotate.sigma_lo, c.ambient.annotate.sigma_hi = 0.02, 2.0
    c.ambient.annotate.num_sigmas, c.ambient.annotate.num_draws = 12, 4
    c.ambient.annotate.batch_size = 32
    return c


def test_classifier_annotation_is_monotone_in_blur_strength():
    """White-noise 'images' vs their Gaussian blurs: stronger blur removes more high-frequency
    power, so the level where noise hides it (σ_min) must grow with the blur."""
    c = classifier_config()
    rng = np.random.default_rng(0)
    clean = (0.4 * rng.standard_normal((512, 16, 16, 1))).astype(np.float32)
    strengths = (0.4, 0.8, 1.6)
    blurred = [np.asarray(corruptions.gaussian_blur(jnp.asarray(clean[i::3]), s))
               for i, s in enumerate(strengths)]
    mesh = devices.make_data_mesh()
    params, meta = noise_classifier.train(c, clean, np.concatenate(blurred), mesh)
    assert meta["final_accuracy"] > 0.6
    test = (0.4 * rng.standard_normal((32, 16, 16, 1))).astype(np.float32)
    medians = []
    for s in strengths:
        images = np.asarray(corruptions.gaussian_blur(jnp.asarray(test), s))
        probs = noise_classifier.probabilities(c, params, images, np.arange(32), mesh)
        sigma_min = noise_classifier.sigma_min_from_probabilities(
            probs, noise_classifier.sigma_grid(c.ambient.annotate), 0.05, 3)
        medians.append(float(np.median(sigma_min)))
    clean_probs = noise_classifier.probabilities(c, params, test, np.arange(32), mesh)
    assert medians[0] <= medians[1] <= medians[2], medians
    assert medians[0] < medians[2], medians
    assert clean_probs[:, 0].mean() < 0.5  # the clean images are told apart at low noise


# ----- the run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """40 8×8 grey images with fine detail (a checkerboard times a smooth random field)."""
    folder = tmp_path_factory.mktemp("amb_imgs")
    rng = np.random.default_rng(0)
    checker = np.indices((8, 8)).sum(axis=0) % 2
    for i in range(40):
        coarse = np.kron(rng.uniform(0.2, 1.0, (2, 2)), np.ones((4, 4)))
        img = (255 * coarse * (0.5 + 0.5 * checker)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return str(folder)


def ambient_config(folder):
    c = tiny_config(image_size=8)
    c.mode = "ambient"
    c.data.source, c.data.folder = "folder", folder
    c.corrupt.clean_count = 8
    c.corrupt.type, c.corrupt.sigma_px = "gaussian_blur", 0.8
    c.ambient.annotation, c.ambient.fixed_sigma_min = "fixed", 0.4
    return c


def test_ambient_run_with_fixed_annotation(image_folder, tmp_path):
    c = ambient_config(image_folder)
    workdir = str(tmp_path / "run")
    state = run(c, workdir)
    assert int(state.step) == 8 and int(state.nonfinite_grads) == 0
    summary = json.load(open(os.path.join(workdir, "ambient_summary.json")))
    assert summary["clean"] == 8 and summary["low_quality"] == 32
    assert summary["annotation_summary"]["sigma_min_quantiles"]["median"] == 0.4
    assert 0.2 < summary["low_quality_share"] < 0.8
    assert np.isfinite(summary["train_loss"])
    data_dir = os.path.join(workdir, "data")
    (name, record), = prepare.read_manifest(data_dir)["annotations"].items()
    assert name.startswith("fixed-") and record["settings"]["sigma_min"] == 0.4
    np.testing.assert_array_equal(annotations_lib.load(data_dir, name)["sigma_min"],
                                  np.full(32, 0.4))
    c = _with_dir(c, workdir)
    assert name in prepare.prepare(c)["annotations"]  # preparing again is still a no-op
    # Another σ_min is another annotation beside the first; the same one is not redone.
    c.ambient.fixed_sigma_min = 0.6
    mesh = devices.make_data_mesh()
    other = ambient.annotate(c, workdir, mesh)
    assert other != name and ambient.annotate(c, workdir, mesh) == other
    assert len(prepare.read_manifest(data_dir)["annotations"]) == 2


def _with_dir(c, workdir):
    c = c.copy_and_resolve_references()
    c.corrupt.output_dir = os.path.join(workdir, "data")
    return c


def test_damaged_annotation_is_reported(image_folder, tmp_path):
    c = _with_dir(ambient_config(image_folder), str(tmp_path))
    prepare.prepare(c)
    mesh = devices.make_data_mesh()
    name = ambient.annotate(c, str(tmp_path), mesh)
    record = annotations_lib.record(c.corrupt.output_dir, name)
    path = os.path.join(c.corrupt.output_dir, record["arrays"]["sigma_min"]["file"])
    with open(path, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ValueError, match="sigma_min"):
        ambient.training_set(c, str(tmp_path), mesh)


def test_folder_of_low_quality_images_and_known_noise(image_folder, tmp_path):
    c = ambient_config(image_folder)
    c.corrupt.type, c.corrupt.folder = "folder", image_folder  # the same images as 'bad' ones
    c.corrupt.clean_count = 10
    c.corrupt.output_dir = str(tmp_path / "data")
    manifest = prepare.prepare(c)
    assert manifest["counts"] == {"source": 40, "clean": 10, "noisy": 40}
    assert manifest["shards"]["eval_only"] == {}
    # Gaussian-noise data with known σ_n (TweedieDiff): σ_min is raised to σ_n = 0.3.
    c.corrupt.type, c.corrupt.folder = "gaussian_noise", ""
    c.corrupt.sigma, c.ambient.fixed_sigma_min, c.corrupt.clean_count = 0.3, 0.0, 8
    c.corrupt.output_dir = str(tmp_path / "noisy")
    prepare.prepare(c)
    dataset, ann, facts = ambient.training_set(c, str(tmp_path), devices.make_data_mesh())
    assert facts["sigma_n"] == 0.3 and len(dataset) == len(ann) == 40
    np.testing.assert_array_equal(ann.sigma_n, np.r_[np.zeros(8), np.full(32, 0.3)])
    np.testing.assert_array_equal(ann.sigma_min, ann.sigma_n)
    assert np.abs(dataset.images.all_rows()).max() > 1.0  # noisy values stay unclipped


def test_annotations_from_a_file(image_folder, tmp_path):
    """Per-image σ_min, σ_max and σ_n from a user's .npz (32 low-quality images)."""
    c = _with_dir(ambient_config(image_folder), str(tmp_path))
    prepare.prepare(c)
    mesh = devices.make_data_mesh()
    path = str(tmp_path / "ann.npz")
    sigma_min = np.linspace(0.1, 1.0, 32)
    sigma_max = np.r_[np.full(16, 0.05), np.zeros(16)]
    sigma_n = np.r_[np.zeros(16), np.full(16, 0.2)]
    np.savez(path, sigma_min=sigma_min, sigma_max=sigma_max, sigma_n=sigma_n)
    c.ambient.annotation, c.ambient.annotation_file = "file", path
    _, ann, facts = ambient.training_set(c, str(tmp_path), mesh)
    np.testing.assert_array_equal(ann.sigma_min[8:], np.maximum(sigma_min, sigma_n))
    np.testing.assert_array_equal(ann.sigma_max[8:], sigma_max)
    np.testing.assert_array_equal(ann.sigma_n[8:], sigma_n)
    assert facts["annotation"].startswith("file-") and facts["sigma_n"] == 0.2
    np.savez(path, sigma_min=sigma_min[:5])
    with pytest.raises(ValueError, match=r"sigma_min has shape \(5,\)"):
        ambient.annotate(c, str(tmp_path), mesh)
    np.savez(path, sigma_min=sigma_min, weights=sigma_min)
    with pytest.raises(ValueError, match="weights"):
        ambient.annotate(c, str(tmp_path), mesh)
    c.ambient.annotation_file = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="annotation_file"):
        ambient.annotate(c, str(tmp_path), mesh)


def test_unknown_annotation_method_is_refused(image_folder, tmp_path):
    c = ambient_config(image_folder)
    c.ambient.annotation = "oracle"
    with pytest.raises(ValueError, match="ambient.annotation"):
        run(c, str(tmp_path / "run"))


@pytest.mark.slow
def test_ambient_benchmark_smoke(tmp_path):
    """benchmarks/ambient_mnist.py end to end (tiny) on its classifier-annotated row: the
    noise classifier trained and the annotation made inside the run, then the metrics."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import ambient_mnist

    out, archive = str(tmp_path / "bench"), str(tmp_path / "archive")
    text = ambient_mnist.main(["--out", out, "--smoke", "--rows", "ambient_classifier",
                               "--archive", archive])
    (result,) = json.load(open(os.path.join(out, "results_smoke.json")))
    assert result["row"] == "ambient_classifier"
    assert np.isfinite(result["classifier_fd"]) and np.isfinite(result["swd"])
    assert 0 <= result["memorised_fraction_train_pixel"] <= 1
    assert 0 <= result["recall"] <= 1 and np.isfinite(result["d1_ratio_data_pixel"])
    assert os.path.exists(os.path.join(out, "smoke", "ambient_classifier", "eval",
                                       "copies_final.png"))
    assert 0.0 < result["low_quality_share"] < 1.0
    assert "| smoke | ambient_classifier |" in text and text.rstrip().endswith("| 0 |")
    assert os.path.exists(os.path.join(out, "samples_smoke.png"))
    manifest = prepare.read_manifest(os.path.join(out, "smoke", "data"))
    (record,) = manifest["annotations"].values()
    assert record["method"] == "classifier" and record["classifier"]["steps"] == 40
    assert len(record["mean_probability"]) == len(record["grid"]) == 8
    assert os.listdir(os.path.join(out, "smoke", "ambient_classifier", "annotator"))
    # The archived row rebuilds the table elsewhere, training nothing; rows not finished
    # (another seed) are left out with --finished_only.
    assert os.listdir(archive) == ["seed0_smoke_ambient_classifier.json"]
    elsewhere = str(tmp_path / "elsewhere")
    assert ambient_mnist.main(["--out", elsewhere, "--smoke", "--rows", "ambient_classifier",
                               "--seeds", "0,1", "--archive", archive,
                               "--finished_only"]) == text
    assert not os.path.exists(os.path.join(elsewhere, "smoke"))


def test_annotate_command_steps(image_folder, tmp_path):
    """``python -m sfbd_jax.annotate``'s two steps: the classifier is trained once and cached;
    the annotation lands in the manifest; a damaged classifier file is reported, not retrained."""
    from sfbd_jax.annotate import annotate_command

    c = ambient_config(image_folder)
    c.ambient.annotation = "classifier"
    for key, value in classifier_config(8).ambient.classifier.items():
        c.ambient.classifier[key] = value
    c.ambient.classifier.steps, c.ambient.classifier.batch_size = 10, 16
    c.ambient.annotate.num_sigmas, c.ambient.annotate.batch_size = 6, 16
    workdir = str(tmp_path / "w")
    made = annotate_command(c, workdir, "train_classifier")
    assert made["classifier"]["steps"] == 10
    (folder,) = os.listdir(os.path.join(workdir, "annotator"))
    made = annotate_command(c, workdir, "annotate")  # reuses the cached classifier
    assert made["annotation"].startswith("classifier-")
    assert made["record"]["summary"]["count"] == 32
    assert made["record"]["classifier"] == json.load(
        open(os.path.join(workdir, "annotator", folder, "meta.json")))
    params = os.path.join(workdir, "annotator", folder, "params.msgpack")
    flip_bytes(params)  # still valid msgpack: only the integrity record sees it
    with pytest.raises(ValueError, match="cannot read the noise classifier.*contents changed"):
        annotate_command(c, workdir, "train_classifier")
    with open(params, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="cannot read the noise classifier"):
        annotate_command(c, workdir, "train_classifier")
