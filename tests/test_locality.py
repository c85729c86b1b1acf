"""Ambient-Omni locality: the receptive field per σ, crops, the crop classifier's σ_max."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfbd_jax.methods import receptive_field as rf
from sfbd_jax.models.precond import edm_coefficients

SIGMA_DATA = 0.5


def conv_stack_denoiser(depth: int):
    """D(x; σ) = c_skip(σ)·x + c_out(σ)·K^depth(x): K a 3×3 all-positive depthwise kernel
    with zero padding (gain 1), so an output pixel depends on exactly the (2·depth + 1)²
    square around it."""
    taps = np.random.default_rng(0).uniform(0.5, 1.5, (3, 3))
    kernel = jnp.asarray(taps / taps.sum(), jnp.float32)  # gain 1

    def denoise(params, x, sigma, labels=None, **_):
        c = x.shape[-1]
        rhs = jnp.tile(kernel[:, :, None, None], (1, 1, 1, c))
        h = x
        for _ in range(depth):
            h = jax.lax.conv_general_dilated(h, rhs, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=c)
        c_skip, c_out, _, _ = edm_coefficients(sigma, SIGMA_DATA)
        return c_skip[:, None, None, None] * x + c_out[:, None, None, None] * h

    return denoise


@pytest.mark.parametrize("depth", [1, 3, 5])
def test_receptive_field_of_a_conv_stack_is_its_depth(depth):
    images = np.random.default_rng(1).uniform(-1, 1, (4, 16, 16, 2)).astype(np.float32)
    maps = rf.gradient_maps(conv_stack_denoiser(depth), None, images, np.array([2.0, 80.0]),
                            jax.random.PRNGKey(0))
    assert maps.shape == (2, 16, 16)
    ic, jc = rf.centre(16, 16)
    support = np.zeros((16, 16), bool)
    support[ic - depth:ic + depth + 1, jc - depth:jc + depth + 1] = True
    for m in maps:  # exactly the square: nothing outside, everything inside
        assert (m[~support] == 0).all() and (m[support] > 0).all()
        assert rf.radius_for_mass(m, 1.0) == depth
        assert rf.radius_for_mass(m, 0.5) <= depth


def test_receptive_field_grows_with_sigma_under_edm_preconditioning():
    """c_skip → 1 at small σ (the output is the input pixel itself), the network at large σ."""
    images = np.random.default_rng(2).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
    sigmas = np.geomspace(0.002, 80.0, 8)
    record = rf.curve(conv_stack_denoiser(4), None, images, sigmas, jax.random.PRNGKey(0),
                      mass=0.9)
    assert record["radii"][0] == 0 and record["crop_sizes"][0] == 1
    assert record["radii"][-1] >= 3
    assert record["crop_sizes"] == sorted(record["crop_sizes"])  # non-decreasing
    assert max(record["crop_sizes"]) <= 16


def test_radius_for_mass_counts_chebyshev_rings():
    g = np.zeros((9, 9))
    g[4, 4], g[4, 6], g[0, 0] = 1.0, 1.0, 2.0  # rings 0, 2, 4: cumulative 0.25, 0.5, 1.0
    assert rf.radius_for_mass(g, 0.25) == 0
    assert rf.radius_for_mass(g, 0.3) == 2
    assert rf.radius_for_mass(g, 0.5) == 2
    assert rf.radius_for_mass(g, 0.9) == 4
    assert rf.radius_for_mass(np.zeros((5, 5)), 0.9) == 0
    with pytest.raises(ValueError, match="mass"):
        rf.radius_for_mass(g, 0.0)
    assert rf.crop_size(10, 16) == 16 and rf.crop_size(3, 16) == 7


def test_curve_rejects_a_bad_grid():
    images = np.zeros((1, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="increasing"):
        rf.curve(conv_stack_denoiser(1), None, images, np.array([1.0, 0.5]),
                 jax.random.PRNGKey(0), 0.9)


# ----- crops and the crop classifier --------------------------------------------------------

from sfbd_jax.methods import locality  # noqa: E402


def test_crops_are_exact_slices_at_the_borders():
    images = np.random.default_rng(3).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
    tops, lefts, sizes = np.array([0, 5, 0, 2]), np.array([0, 5, 6, 0]), np.array([3, 3, 2, 8 - 2])
    sizes[3] = 6
    crops = locality.extract_crops(images, tops, lefts, sizes, canvas=8)
    assert crops.shape == (4, 8, 8, 3 + 1)  # the pixels and the crop's mask
    for b in range(4):
        t, lf, s = tops[b], lefts[b], sizes[b]
        np.testing.assert_array_equal(crops[b, :s, :s, :3], images[b, t:t + s, lf:lf + s])
        assert (crops[b, :s, :s, 3] == 1).all()
        assert (crops[b, s:] == 0).all() and (crops[b, :, s:] == 0).all()
    whole = locality.extract_crops(images, np.zeros(4), np.zeros(4), np.full(4, 8), 8)
    np.testing.assert_array_equal(whole[..., :3], images)
    assert (whole[..., 3] == 1).all()
    with pytest.raises(ValueError, match="outside"):
        locality.extract_crops(images, np.array([6, 0, 0, 0]), np.zeros(4), np.full(4, 3), 8)
    with pytest.raises(ValueError, match="crop sizes"):
        locality.extract_crops(images, np.zeros(4), np.zeros(4), np.full(4, 9), 8)
    with pytest.raises(ValueError, match="larger than"):
        locality.crop_positions(np.random.default_rng(0), np.array([9]), 8, 8)


def test_crop_positions_reach_every_border():
    tops, lefts = locality.crop_positions(np.random.default_rng(0), np.full(4000, 3), 8, 8)
    assert tops.min() == 0 and tops.max() == 5 and lefts.min() == 0 and lefts.max() == 5
    assert np.bincount(tops).min() > 500  # uniform over the 6 positions


def test_sigma_max_is_the_last_level_of_the_indistinguishable_prefix():
    grid = np.array([0.1, 0.2, 0.4, 0.8])
    probs = np.array([[0.5, 0.5, 0.5, 0.5],    # never told apart → the largest level
                      [0.5, 0.5, 0.9, 0.5],    # told apart at 0.4: a later dip does not count
                      [0.9, 0.5, 0.5, 0.5],    # told apart at the smallest → the smallest
                      [0.54, 0.56, 0.5, 0.5]])  # ε = 0.05: 0.56 is told apart
    sigma_max = locality.sigma_max_from_probabilities(probs, grid, 0.05, 1)
    np.testing.assert_array_equal(sigma_max, [0.8, 0.2, 0.1, 0.1])
    by_size = np.array([[0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(locality.per_level(by_size, [1, 1, 3, 5, 5]),
                                  [[0.1, 0.1, 0.2, 0.3, 0.3]])


def _pools(n=256, side=16, seed=0):
    """Clean: i.i.d. uniform pixels. Pools: the same distribution (identical), 4×4
    block-constant uniform pixels (same marginal, told apart only by crops ≥ 2 px), and
    pixels in [0.9, 1] (told apart by a single pixel)."""
    rng = np.random.default_rng(seed)
    u = lambda: rng.uniform(-1, 1, (n, side, side, 1)).astype(np.float32)  # noqa: E731
    clean = u()
    coarse = rng.uniform(-1, 1, (n, side // 4, side // 4, 1)).astype(np.float32)
    blocky = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    bright = rng.uniform(0.9, 1, (n, side, side, 1)).astype(np.float32)
    return clean, {"identical": u(), "blocky": blocky, "bright": bright}


def _crop_config():
    from configs import default

    c = default.get_config()
    c.data.image_size, c.data.channels = 16, 1
    k = c.ambient.crop_classifier
    k.base_channels, k.channel_mult, k.channels_per_head = 8, (1, 2), 8
    k.batch_size, k.steps, k.lr, k.log_every_steps = 64, 250, 3e-3, 50
    c.ambient.locality.num_crops = 8
    c.ambient.annotate.batch_size = 64
    return c


@pytest.mark.parametrize("pool_name,expected", [("identical", 0.8), ("blocky", 0.2),
                                                ("bright", 0.1)])
def test_sigma_max_follows_how_separable_the_pools_are(pool_name, expected):
    from sfbd_jax.utils import devices

    config = _crop_config()
    clean, pools = _pools()
    pool = pools[pool_name]
    mesh = devices.make_data_mesh()
    grid = np.array([0.1, 0.15, 0.2, 0.4, 0.8])
    sizes = [1, 1, 1, 5, 9]
    params, meta = locality.train_classifier(config, clean, pool, sizes, mesh)
    assert meta["crop_sizes"] == [1, 5, 9]
    held_out = _pools(n=32, seed=1)[1][pool_name]
    by_size = locality.crop_probabilities(config, params, held_out, np.arange(32), sizes, mesh)
    assert by_size.shape == (32, 3)
    sigma_max = locality.sigma_max_from_probabilities(
        locality.per_level(by_size, sizes), grid, 0.05, 1)
    share = np.mean(np.isclose(sigma_max, expected))
    assert share >= 0.9, (share, by_size.mean(axis=0))


# ----- the 'crops' annotation in a mode=ambient run -----------------------------------------


@pytest.fixture(scope="module")
def digit_like_folder(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("locality_imgs")
    rng = np.random.default_rng(0)
    for i in range(40):
        img = np.kron(rng.uniform(0, 1, (2, 2)), np.ones((4, 4))) * 255
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:02d}.png")
    return str(folder)


def crops_config(folder):
    from conftest import tiny_config

    c = tiny_config(image_size=8)
    c.mode = "ambient"
    c.data.source, c.data.folder = "folder", folder
    c.corrupt.clean_count = 8
    c.corrupt.type, c.corrupt.sigma_px = "gaussian_blur", 0.8
    c.ambient.annotation = "crops"
    c.ambient.locality.denoiser_images = 16
    c.ambient.locality.num_images, c.ambient.locality.num_crops = 4, 2
    c.ambient.locality.high_noise, c.ambient.fixed_sigma_min = "fixed", 0.4
    k = c.ambient.crop_classifier
    k.base_channels, k.channel_mult, k.channels_per_head = 8, (1, 2), 8
    k.batch_size, k.steps, k.log_every_steps = 8, 4, 2
    c.ambient.annotate.num_sigmas, c.ambient.annotate.batch_size = 6, 8
    return c


def _initial_checkpoint(config, run_dir: str) -> str:
    """A run directory whose checkpoints/ hold the initial state of ``config``'s network."""
    import os

    from sfbd_jax.training import loop
    from sfbd_jax.utils import checkpoints

    ckpt = checkpoints.Checkpointer(os.path.join(run_dir, "checkpoints"), enable_async=False)
    ckpt.save(0, loop.Experiment(config).init_state())
    ckpt.close()
    return run_dir


def test_crops_annotation_in_the_manifest_and_the_training_set(digit_like_folder, tmp_path):
    import os

    from sfbd_jax.data import annotations as annotations_lib
    from sfbd_jax.data import prepare
    from sfbd_jax.methods import ambient
    from sfbd_jax.utils import devices

    c = crops_config(digit_like_folder)
    workdir = str(tmp_path / "run")
    data_dir = c.corrupt.output_dir = os.path.join(workdir, "data")
    prepare.prepare(c)
    mesh = devices.make_data_mesh()
    # The denoiser from a checkpoint (its initial state: the path is what is tested here; the
    # slow test below trains one).
    c.ambient.locality.denoiser_checkpoint = _initial_checkpoint(c, str(tmp_path / "denoiser"))
    name = ambient.annotate(c, workdir, mesh)
    (listed, record), = prepare.read_manifest(data_dir)["annotations"].items()
    assert listed == name and name.startswith("crops-")
    curve = record["receptive_field"]
    assert len(curve["crop_sizes"]) == 6 == len(record["grid"])
    assert curve["crop_sizes"] == sorted(curve["crop_sizes"]) and max(curve["crop_sizes"]) <= 8
    assert os.path.exists(os.path.join(data_dir, "annotations", name, "receptive_field.png"))
    arrays = annotations_lib.load(data_dir, name)
    np.testing.assert_array_equal(arrays["sigma_min"], np.full(32, 0.4))
    assert np.isin(arrays["sigma_max"], record["grid"]).all()
    # The annotation belongs to the data: another training seed finds it (and trains nothing).
    c.seed = 7
    assert ambient.annotate(c, workdir, mesh) == name
    # Training sees both rules: σ_min = 0.4 and the per-image σ_max.
    _, ann, facts = ambient.training_set(c, workdir, mesh)
    assert facts["annotation"] == name
    np.testing.assert_array_equal(ann.sigma_max[8:], arrays["sigma_max"])
    np.testing.assert_array_equal(ann.sigma_min[8:], np.full(32, 0.4))


@pytest.mark.slow
def test_crops_annotation_with_the_noise_classifier_at_high_noise(digit_like_folder, tmp_path):
    """σ_max from the crops and σ_min from the noise classifier: another annotation beside the
    first, the denoiser and the crop classifier reused (one cached folder each)."""
    import os

    from sfbd_jax.data import annotations as annotations_lib
    from sfbd_jax.data import prepare
    from sfbd_jax.methods import ambient
    from sfbd_jax.utils import devices

    c = crops_config(digit_like_folder)
    workdir = str(tmp_path / "run")
    data_dir = c.corrupt.output_dir = os.path.join(workdir, "data")
    prepare.prepare(c)
    mesh = devices.make_data_mesh()
    name = ambient.annotate(c, workdir, mesh)  # trains the denoiser on the 8 clean images
    record = annotations_lib.record(data_dir, name)
    arrays = annotations_lib.load(data_dir, name)
    assert record["receptive_field"]["crop_sizes"] == sorted(
        record["receptive_field"]["crop_sizes"])
    c.ambient.locality.high_noise = "classifier"
    c.ambient.classifier.base_channels, c.ambient.classifier.channel_mult = 8, (1, 2)
    c.ambient.classifier.channels_per_head, c.ambient.classifier.batch_size = 8, 8
    c.ambient.classifier.steps, c.ambient.classifier.log_every_steps = 4, 2
    other = ambient.annotate(c, workdir, mesh)
    assert other != name and ambient.annotate(c, workdir, mesh) == other
    again = annotations_lib.load(data_dir, other)
    np.testing.assert_array_equal(again["sigma_max"], arrays["sigma_max"])
    assert np.isin(again["sigma_min"], record["grid"]).all()
    made = os.listdir(os.path.join(workdir, "annotator"))
    assert len(made) == 3 and {d.split("-")[0] for d in made} >= {"crops", "denoiser"}


def test_crops_annotation_errors(digit_like_folder, tmp_path):
    from sfbd_jax.config_checks import validate_config
    from sfbd_jax.run import run

    c = crops_config(digit_like_folder)
    c.ambient.locality.denoiser_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="denoiser_checkpoint"):
        run(c, str(tmp_path / "run"))
    c = crops_config(digit_like_folder)
    c.ambient.locality.high_noise = "sometimes"
    with pytest.raises(ValueError, match="high_noise"):
        validate_config(c)
    c = crops_config(digit_like_folder)
    c.ambient.locality.mass = 1.5
    with pytest.raises(ValueError, match="mass"):
        validate_config(c)


# ----- out-of-distribution pools ------------------------------------------------------------


def ood_config(tmp_path, **corrupt):
    from conftest import tiny_config

    c = tiny_config(image_size=8)
    c.data.classes = (0, 1, 2, 3, 4)
    c.corrupt.type, c.corrupt.ood_classes, c.corrupt.clean_count = "ood", (5, 6, 7, 8, 9), 20
    c.corrupt.output_dir = str(tmp_path / "data")
    for k, v in corrupt.items():
        c.corrupt[k] = v
    return c


def test_ood_pool_of_other_classes(tmp_path):
    from sfbd_jax.data import prepare, sources
    from sfbd_jax.data.prepared import PreparedDataset

    c = ood_config(tmp_path)
    manifest = prepare.prepare(c)
    labels = sources.load_mnist5k().labels
    n_target = int(np.isin(labels, range(5)).sum())
    n_pool = int(np.isin(labels, range(5, 10)).sum())
    assert manifest["counts"] == {"source": n_target, "clean": 20, "noisy": n_pool}
    assert manifest["storage"]["noisy"] == "uint8" and manifest["shards"]["eval_only"] == {}
    data = PreparedDataset(c.corrupt.output_dir)
    clean, (pool, indices) = data.clean(), data.noisy()
    assert set(np.unique(clean.labels)) <= set(range(5))
    assert set(np.unique(pool.labels)) == set(range(5, 10))
    assert indices.min() == n_target  # the pool's indices count on after the source's
    # The pool is the other classes' images as they are (resized like config.data).
    other = c.copy_and_resolve_references()
    other.data.classes = (5, 6, 7, 8, 9)
    np.testing.assert_array_equal(pool.images, sources.load_source(other.data).images)
    assert prepare.prepare(c) == manifest  # a no-op the second time (settings round trip)
    # The target classes alone define the evaluation's reference.
    assert len(sources.load_source(c.data)) == n_target


def test_ood_pool_errors(tmp_path):
    import tensorflow_datasets as tfds

    from sfbd_jax.config_checks import check_corruption
    from sfbd_jax.data import prepare

    c = ood_config(tmp_path, ood_classes=(4, 5))
    with pytest.raises(ValueError, match="share"):
        check_corruption(c)
    c = ood_config(tmp_path, ood_classes=())
    with pytest.raises(ValueError, match="exactly one source"):
        check_corruption(c)
    # A pool of another image shape: RGB images where the target is grey.
    c = ood_config(tmp_path, ood_classes=(), ood_tfds_name="cifar10")
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match="out-of-distribution pool.*3 channels"):
            prepare.prepare(c)
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.partial").exists()
    c = ood_config(tmp_path, ood_classes=(11,))
    with pytest.raises(ValueError, match="out-of-distribution pool.*no images"):
        prepare.prepare(c)


# ----- mixed-corruption pools ---------------------------------------------------------------

MIXTURE = "gaussian_blur:sigma_px=0.8; jpeg:quality=20,weight=2; gaussian_noise:sigma=0.2; ood"


def test_parse_mixture_and_its_errors():
    from sfbd_jax.corruptions import parse_mixture

    assert parse_mixture(MIXTURE) == [
        {"type": "gaussian_blur", "sigma_px": 0.8, "weight": 1.0},
        {"type": "jpeg", "quality": 20, "weight": 2.0},
        {"type": "gaussian_noise", "sigma": 0.2, "weight": 1.0}, {"type": "ood", "weight": 1.0}]
    for spec, match in [("blur:sigma_px=1", "unknown type"), ("jpeg:q=20", "not one of"),
                        ("motion_blur:length=5", "needs"), ("jpeg:quality=x", "quality=x"),
                        ("ood", "besides 'ood'"), ("jpeg:quality=20; ood; ood", "more than once"),
                        ("", "needs config.corrupt.mixture"),
                        ("jpeg:quality=20,weight=0", "weight")]:
        with pytest.raises(ValueError, match=match):
            parse_mixture(spec)


def mixed_config(tmp_path, name="data", shard_size=10_000):
    c = ood_config(tmp_path)
    c.corrupt.type, c.corrupt.mixture, c.corrupt.shard_size = "mixed", MIXTURE, shard_size
    c.corrupt.output_dir = str(tmp_path / name)
    return c


def test_mixed_pool_records_each_images_component(tmp_path):
    from sfbd_jax import corruptions
    from sfbd_jax.data import prepare, shards, sources
    from sfbd_jax.data.prepared import PreparedDataset

    c = mixed_config(tmp_path)
    manifest = prepare.prepare(c)
    assert [m["type"] for m in manifest["mixture"]] == ["gaussian_blur", "jpeg",
                                                       "gaussian_noise", "ood"]
    assert prepare.prepare(c) == manifest  # the settings round trip: a no-op
    data = PreparedDataset(c.corrupt.output_dir)
    pool, _ = data.noisy()
    types = data.noisy_types()
    originals = shards.read_images(c.corrupt.output_dir, manifest["shards"]["eval_only"]
                                   ["originals"])
    labels = sources.load_mnist5k().labels
    n_target, n_ood = int(np.isin(labels, range(5)).sum()), int(np.isin(labels, range(5, 10)).sum())
    corrupted = n_target - 20
    assert len(pool) == len(types) == len(originals) == corrupted + n_ood
    counts = np.bincount(types, minlength=4)
    assert counts[3] == n_ood and (types[corrupted:] == 3).all()
    np.testing.assert_allclose(counts[:3] / corrupted, [0.25, 0.5, 0.25], atol=0.05)
    # Every row is its original under its own component (within the float16 storage).
    bound = manifest["storage_rounding"]["max_abs"]
    key = __import__("jax").random.PRNGKey(c.corrupt.noise_seed)
    _, indices = data.noisy()
    for k in range(3):
        rows = np.flatnonzero(types == k)[:16]
        expected = corruptions.apply_corruption(originals[rows], manifest["mixture"][k], key,
                                                indices[rows])
        np.testing.assert_allclose(pool.images[rows], expected, atol=bound + 1e-6)
    np.testing.assert_allclose(pool.images[corrupted:], originals[corrupted:], atol=bound)
    # The assignment is a function of the source position, not of the sharding.
    other = prepare.prepare(mixed_config(tmp_path, "data_small_shards", shard_size=300))
    assert other["shards"]["noisy"]["types"] != manifest["shards"]["noisy"]["types"]
    np.testing.assert_array_equal(PreparedDataset(str(tmp_path / "data_small_shards"))
                                  .noisy_types(), types)


def test_per_type_annotation_with_known_noise(tmp_path):
    from sfbd_jax.data import prepare
    from sfbd_jax.data.prepared import PreparedDataset
    from sfbd_jax.methods import ambient
    from sfbd_jax.utils import devices

    c = mixed_config(tmp_path)
    c.mode = "ambient"
    prepare.prepare(c)
    c.ambient.annotation = "per_type"
    c.ambient.type_sigma_min = (0.4, 1.0, 0.0, float("inf"))
    c.ambient.type_sigma_max = (0.0, 0.0, 0.0, 0.05)
    _, ann, facts = ambient.training_set(c, str(tmp_path), devices.make_data_mesh())
    types = PreparedDataset(c.corrupt.output_dir).noisy_types()
    n_clean = 20
    np.testing.assert_array_equal(ann.sigma_n[n_clean:], np.where(types == 2, 0.2, 0.0))
    np.testing.assert_array_equal(  # σ_min raised to the known noise of the noise component
        ann.sigma_min[n_clean:], np.array([0.4, 1.0, 0.2, np.inf])[types])
    np.testing.assert_array_equal(ann.sigma_max[n_clean:], np.array([0, 0, 0, 0.05])[types])
    assert facts["annotation"].startswith("per_type-") and facts["sigma_n"] == 0.2
    by_type = facts["annotation_by_type"]  # the summary per component, in the mixture's order
    assert list(by_type) == ["0:gaussian_blur", "1:jpeg", "2:gaussian_noise", "3:ood"]
    assert [by_type[k]["count"] for k in by_type] == np.bincount(types, minlength=4).tolist()
    assert by_type["1:jpeg"]["sigma_min_quantiles"]["median"] == 1.0
    assert by_type["2:gaussian_noise"]["sigma_min_quantiles"]["max"] == 0.2
    assert by_type["3:ood"]["infinite"] == by_type["3:ood"]["count"]
    assert by_type["3:ood"]["sigma_max_quantiles"]["median"] == 0.05
    c.ambient.type_sigma_min = (0.4, 1.0)
    with pytest.raises(ValueError, match="4 components"):
        ambient.annotate(c, str(tmp_path), devices.make_data_mesh())


def test_crop_probabilities_do_not_depend_on_batching():
    from sfbd_jax.utils import devices

    config = _crop_config()
    clean, pools = _pools(n=20)
    params = jax.tree.map(lambda s: jax.random.normal(jax.random.PRNGKey(1), s.shape) * 0.1,
                          locality.init_template(config))
    mesh = devices.make_data_mesh()
    results = []
    for batch in (4, 16):
        config.ambient.annotate.batch_size = batch
        results.append(locality.crop_probabilities(config, params, pools["blocky"],
                                                   np.arange(100, 120), [1, 3, 3, 7], mesh))
    assert results[0].shape == (20, 3)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)
    assert np.ptp(results[0]) > 0  # not a constant: the crops differ


@pytest.mark.slow
def test_ambient_ood_benchmark_smoke(tmp_path):
    """benchmarks/ambient_ood_mnist.py end to end (tiny) on the crop-classifier row for two
    training seeds: one annotation (denoiser, crop classifier) shared by both, the metrics
    against the target digits, the table's compute columns."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import ambient_ood_mnist

    from sfbd_jax.data import prepare

    out, archive = str(tmp_path / "bench"), str(tmp_path / "archive")
    text = ambient_ood_mnist.main(["--out", out, "--smoke", "--rows", "locality_crops",
                                   "--seeds", "0,1", "--archive", archive])
    results = json.load(open(os.path.join(out, "results.json")))
    assert [r["seed"] for r in results] == [0, 1]
    for r in results:
        assert np.isfinite(r["classifier_fd"]) and 0 <= r["recall"] <= 1
        assert 0.0 < r["low_quality_share"] < 1.0 and r["sigma_max_median"] > 0
        assert r["annotation_images"] == 64 + 20 * 32 and r["train_images"] == 128
    manifest = prepare.read_manifest(os.path.join(out, "data", "ood"))
    (record,) = manifest["annotations"].values()  # one annotation for both seeds
    assert record["method"] == "crops"
    shared = os.listdir(os.path.join(out, "annotator", "ood"))
    assert sorted(d.split("-")[0] for d in shared) == ["crops", "denoiser"]
    assert "| locality_crops |" in text and text.rstrip().endswith("| 0,1 |")
    # The archived rows rebuild the table on a machine without the runs (nothing retrained).
    assert sorted(os.listdir(archive)) == ["seed0_locality_crops.json",
                                           "seed1_locality_crops.json"]
    again = ambient_ood_mnist.main(["--out", str(tmp_path / "elsewhere"), "--smoke", "--rows",
                                    "locality_crops", "--seeds", "0,1", "--archive", archive])
    assert again == text and not os.path.exists(tmp_path / "elsewhere" / "seed0")
