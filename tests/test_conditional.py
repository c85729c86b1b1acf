"""Class-conditional training: label dropout, classifier-free guidance, and CEP's
condition-embedding perturbation (training only)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config

from sfbd_jax.config_checks import validate_config
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.models import precond, unet
from sfbd_jax.training import loop, step
from sfbd_jax.utils import checkpoints


def _model_config(label_dropout=0.0, base_channels=64, num_classes=10):
    return ml_collections.ConfigDict(dict(label_dropout=label_dropout, num_classes=num_classes,
                                          base_channels=base_channels))


@pytest.mark.parametrize("kind,gamma", [("uniform", 1.0), ("gaussian", 1.0),
                                        ("uniform", 2.0), ("gaussian", 0.5)])
def test_cep_perturbation_distribution_and_scale(kind, gamma):
    d = 64
    transform = step.condition_transform(_model_config(base_channels=d),
                                         ml_collections.ConfigDict(dict(kind=kind, gamma=gamma)))
    labels = jnp.arange(4000) % 10
    out, delta = jax.jit(transform)(labels, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out, labels)  # no label dropout asked
    delta = np.asarray(delta)
    assert delta.shape == (4000, d)
    scale = gamma / np.sqrt(d)
    assert abs(delta.mean()) < 0.01 * scale
    if kind == "uniform":
        assert delta.min() >= -scale and delta.max() <= scale
        assert delta.std() == pytest.approx(scale / np.sqrt(3), rel=0.01)
        assert delta.max() > 0.99 * scale
    else:
        assert delta.std() == pytest.approx(scale, rel=0.01)
    assert not np.allclose(delta[0], delta[1])  # fresh per example


def test_label_dropout_replaces_labels_by_the_null_class():
    transform = step.condition_transform(_model_config(label_dropout=0.3),
                                         ml_collections.ConfigDict(dict(kind="none", gamma=1.0)))
    labels = jnp.arange(20000) % 10
    out, delta = transform(labels, jax.random.PRNGKey(1))
    out = np.asarray(out)
    assert delta is None
    dropped = out == 10
    assert dropped.mean() == pytest.approx(0.3, abs=0.015)
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])


def conditional_config():
    c = tiny_config()
    c.model.num_classes = 3
    c.model.label_dropout = 0.2
    return c


def test_guidance_zero_and_one_are_the_unconditional_and_conditional_models():
    c = conditional_config()
    model = unet.build_unet(c.model, 8, 1)
    params = jax.jit(lambda k: precond.init_params(model, k, (8, 8, 1), True))(
        jax.random.PRNGKey(0))
    params = jax.tree.map(lambda p: p + 0.05, params)  # the label path reaches the output
    denoise = precond.make_denoiser(model, 0.5)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    sigma, labels = jnp.full((4,), 0.7), jnp.array([0, 1, 2, 1])

    @jax.jit  # one program for the five denoiser outputs (eager, each op compiles alone)
    def outputs(params):
        g = lambda w: precond.guided_denoiser(denoise, w, 3)(params, x, sigma, labels)  # noqa
        return (denoise(params, x, sigma, labels), denoise(params, x, sigma, jnp.full((4,), 3)),
                g(1.0), g(0.0), g(2.5))

    cond, uncond, g1, g0, g25 = outputs(params)
    assert not np.allclose(cond, uncond, atol=1e-4)
    np.testing.assert_allclose(g1, cond, atol=1e-6)
    np.testing.assert_allclose(g0, uncond, atol=1e-6)
    np.testing.assert_allclose(g25, uncond + 2.5 * (cond - uncond), atol=1e-5)


def test_conditional_training_with_dropout_and_cep_then_guided_sampling(tmp_path):
    """A few steps with label dropout and CEP-G; the samples of the trained parameters do not
    depend on CEP (it is never applied at sampling), and guidance 0/1 differ."""
    c = conditional_config()
    c.cep.kind = "gaussian"
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.uniform(-1, 1, (32, 8, 8, 1)).astype(np.float32),
                        (np.arange(32) % 3).astype(np.int32), 3, "labelled")
    exp = loop.Experiment(c)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), 2, enable_async=False)
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
    state = exp.train(exp.init_state(), data, end_step=4, phase_start_step=0, data_seed=0,
                      checkpointer=ckpt, writer=writer, workdir=str(tmp_path))
    ckpt.close()
    assert np.isfinite(exp.last_scalars["loss"]) and int(state.nonfinite_grads) == 0
    key, labels = jax.random.PRNGKey(5), np.array([0, 1, 2, 0])
    samples = exp.generate(state.ema_params, 4, key, labels)
    plain = c.copy_and_resolve_references()
    plain.cep.kind = "none"
    np.testing.assert_array_equal(loop.Experiment(plain).generate(state.ema_params, 4, key,
                                                                  labels), samples)
    uncond = c.copy_and_resolve_references()
    uncond.sampler.guidance = 0.0
    assert not np.allclose(loop.Experiment(uncond).generate(state.ema_params, 4, key, labels),
                           samples)


@pytest.mark.parametrize("changes,match", [
    (dict(guidance=2.0), "label dropout"),
    (dict(cep="uniform", classes=0), "class-conditional"),
    (dict(cep="laplace"), "cep.kind"),
    (dict(dropout=0.1, classes=0), "label_dropout > 0 needs"),
    (dict(dropout=1.0), "label_dropout must lie"),
])
def test_bad_conditioning_settings_are_refused(changes, match):
    c = tiny_config()
    c.model.num_classes = changes.get("classes", 3)
    c.model.label_dropout = changes.get("dropout", 0.0)
    c.sampler.guidance = changes.get("guidance", 1.0)
    c.cep.kind = changes.get("cep", "none")
    with pytest.raises(ValueError, match=match):
        validate_config(c)


def test_label_flip_in_the_prepared_data_and_edm_training_set(tmp_path):
    """corrupt.label_flip = η: exactly round(η·N) labels change, never to their own class,
    seeded, recorded in the manifest; mode=edm with data.use_prepared trains on them."""
    from sfbd_jax.data import prepare, shards
    from sfbd_jax.data.prepared import PreparedDataset
    from sfbd_jax.data.sources import load_source

    c = tiny_config(image_size=28)
    c.data.subset = 200
    c.corrupt.clean_count, c.corrupt.clean_fraction = 0, 1.0  # every image clean
    c.corrupt.label_flip, c.corrupt.label_flip_seed = 0.1, 3
    c.data.use_prepared = True
    dataset = loop.edm_dataset(c, str(tmp_path / "run"))
    data_dir = str(tmp_path / "run" / "data")
    manifest = prepare.read_manifest(data_dir)
    assert manifest["counts"] == {"source": 200, "clean": 200, "noisy": 0}
    record = manifest["label_flip"]
    assert record["eta"] == 0.1 and record["seed"] == 3 and record["flipped"] == 20
    source = load_source(c.data)
    changed = np.flatnonzero(dataset.labels != source.labels)
    flipped = shards.read_shard(data_dir, record["flipped_indices"])
    np.testing.assert_array_equal(changed, flipped)  # exactly the recorded ones, all changed
    np.testing.assert_array_equal(shards.read_shard(data_dir, record["original_labels"]),
                                  source.labels[flipped])
    np.testing.assert_array_equal(dataset.images.all_rows(), source.images)  # untouched
    assert len(PreparedDataset(data_dir).clean()) == 200
    c.corrupt.label_flip_seed = 4  # another seed is another data set: refused in place
    with pytest.raises(FileExistsError, match="label_flip"):
        loop.edm_dataset(c, str(tmp_path / "run"))
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    c.data.source, c.data.folder, c.data.subset = "folder", str(tmp_path / "imgs"), 0
    # A folder has no labels to flip.
    c.corrupt.output_dir = str(tmp_path / "other")
    with pytest.raises(ValueError, match="labelled data source"):
        prepare.prepare(c)


@pytest.mark.slow
def test_cep_benchmark_smoke(tmp_path):
    """benchmarks/cep_mnist.py end to end (tiny): flipped labels + CEP-G + label dropout, a
    conditional run, its evaluation with per-class metrics."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import cep_mnist

    archive = str(tmp_path / "archive")
    text = cep_mnist.main(["--out", str(tmp_path), "--smoke", "--archive", archive])
    (row,) = json.load(open(tmp_path / "results.json"))
    assert row["label_flip"] == 0.1 and row["cep"] == "gaussian"
    assert set(row["by_guidance"]) == {"1", "2"}
    for metrics in row["by_guidance"].values():
        for key in ("classifier_fd", "classifier_fd_class_mean", "sample_class_accuracy",
                    "swd", "memorised_fraction_train_pixel", "d1_ratio_data_features",
                    "precision", "recall", "density", "coverage"):
            assert np.isfinite(metrics[key]), key
    assert metrics != row["by_guidance"]["1"]  # guided samples differ
    files = sorted(os.listdir(tmp_path / "seed0" / "smoke" / "eval"))
    evals = [f for f in files if f.endswith(".json")]
    assert len(evals) == 2 and evals[1].endswith("_guidance2.json"), evals
    assert [f for f in files if f.endswith("_copies.png")] == [
        evals[0].replace(".json", "_copies.png"), evals[1].replace(".json", "_copies.png")]
    guided = json.load(open(tmp_path / "seed0" / "smoke" / "eval" / evals[1]))
    assert guided["guidance"] == 2.0 and guided["checkpoint"] == evals[0][:-len(".json")]
    assert "| smoke | 10.0% | gaussian | 1 |" in text and "| smoke | 10.0% | gaussian | 2 |" in text
    # The archived row rebuilds the table on a machine without the run (nothing retrained).
    assert os.listdir(archive) == ["seed0_smoke.json"]
    elsewhere = tmp_path / "elsewhere"
    assert cep_mnist.main(["--out", str(elsewhere), "--smoke", "--archive", archive]) == text
    assert not (elsewhere / "seed0").exists()
    # --finished_only tabulates what is finished and trains nothing: a seed not run is left out.
    assert cep_mnist.main(["--out", str(elsewhere), "--smoke", "--archive", archive,
                           "--seeds", "0,1", "--finished_only"]) == text
    assert not (elsewhere / "seed1").exists()


def test_labels_outside_the_model_classes_are_refused():
    from sfbd_jax.data import pipeline
    from sfbd_jax.utils import devices

    images = np.zeros((8, 8, 8, 1), np.float32)
    mesh = devices.make_data_mesh(1)
    ten = ImageDataset(images, (np.arange(8) % 10).astype(np.int32), 10, "ten classes")
    pipeline.TrainBatches(ten, 8, 1, 0, mesh, 10)  # fits
    with pytest.raises(ValueError, match=r"labels span \[0, 7\].*num_classes = 5"):
        pipeline.TrainBatches(ten, 8, 1, 0, mesh, 5)
    with pytest.raises(ValueError, match="has no labels"):
        pipeline.TrainBatches(ImageDataset(images, None, 0, "unlabelled"), 8, 1, 0, mesh, 3)
    with pytest.raises(ValueError, match="1-D integer"):
        pipeline.validate_labels(np.zeros(8, np.float32), 3, "float labels")
    pipeline.TrainBatches(ImageDataset(images, None, 0, "unlabelled"), 8, 1, 0, mesh, 0)


def conditional_sfbd_config():
    """Conditional SFBD on 48 MNIST-5k digits at 8×8: 8 clean, 40 noisy with their labels (a
    quarter of them flipped), label dropout and CEP-G in training, guided sampling."""
    c = tiny_config(image_size=8)
    c.mode = "sfbd"
    c.data.subset = 48
    c.model.num_classes, c.model.label_dropout = 10, 0.2
    c.cep.kind = "gaussian"
    c.sampler.guidance = 2.0
    c.corrupt.clean_count, c.corrupt.sigma = 8, 0.2
    c.corrupt.label_flip = 0.25
    c.sfbd.pretrain_images, c.sfbd.rounds, c.sfbd.images_per_round = 32, 1, 32
    c.sfbd.backward_num_steps, c.sfbd.denoise_batch_size = 6, 16
    c.train.num_samples = 10
    return c


def test_conditional_sfbd_end_to_end(tmp_path, monkeypatch, two_devices):
    """mode=sfbd with a class-conditional model on labelled data: the backward step denoises
    every noisy image given its own (possibly flipped) label, the forward step trains on the
    denoised ∪ clean set with the labels, samples are drawn per class with guidance."""
    import json

    from sfbd_jax.data.prepared import PreparedDataset
    from sfbd_jax.methods import backward, sfbd
    from sfbd_jax.run import run

    seen = {}
    real_denoise, real_union = backward.denoise_set, sfbd.union_dataset

    def denoise_set(*args, labels=None, **kwargs):
        seen["backward_labels"] = None if labels is None else np.asarray(labels)
        return real_denoise(*args, labels=labels, **kwargs)

    def union_dataset(*args):
        seen["union"] = real_union(*args)
        return seen["union"]

    monkeypatch.setattr(backward, "denoise_set", denoise_set)
    monkeypatch.setattr(sfbd, "union_dataset", union_dataset)
    workdir = tmp_path / "run"
    state = run(conditional_sfbd_config(), str(workdir))
    assert int(state.step) == 4 + 4
    data = PreparedDataset(str(workdir / "data"))
    noisy, clean = data.noisy()[0], data.clean()
    assert data.manifest["label_flip"]["flipped"] == 12
    np.testing.assert_array_equal(seen["backward_labels"], noisy.labels)
    np.testing.assert_array_equal(seen["union"].labels,
                                  np.concatenate([noisy.labels, clean.labels]))
    assert seen["union"].images.shape == (48, 8, 8, 1)
    # The label table has the ten classes and the null class of label dropout.
    tables = [p for path, p in jax.tree_util.tree_leaves_with_path(state.ema_params)
              if "label" in jax.tree_util.keystr(path).lower()]
    assert tables and tables[0].shape[0] == 11
    summary = json.load(open(workdir / "sfbd_summary.json"))
    assert [r["round"] for r in summary] == [0, 1]
    assert np.isfinite(summary[1]["denoised_psnr"])
    assert (workdir / "samples" / "round1.png").exists()


def test_conditional_sfbd_needs_labelled_noisy_data(tmp_path):
    from PIL import Image

    from sfbd_jax.run import run

    (tmp_path / "imgs").mkdir()
    for i in range(16):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    c = conditional_sfbd_config()
    c.data.source, c.data.folder, c.data.subset = "folder", str(tmp_path / "imgs"), 0
    c.corrupt.label_flip = 0.0
    with pytest.raises(ValueError, match="class-conditional.*has no labels"):
        run(c, str(tmp_path / "run"))


@pytest.mark.slow  # end to end, ~25-30 s: keeps the everyday suite well under 15 min
def test_conditional_training_on_tfds_labels(tmp_path):
    """mode=edm on a tfds data set's labels (tfds mock data): prepared with flipped labels,
    trained class-conditionally, sampled per class."""
    import tensorflow_datasets as tfds

    from sfbd_jax.data import prepare
    from sfbd_jax.data.prepared import PreparedDataset
    from sfbd_jax.data.sources import load_source
    from sfbd_jax.run import run

    c = tiny_config(image_size=8)
    c.data.source, c.data.tfds_name, c.data.split = "tfds", "mnist", "train"
    c.data.data_dir = str(tmp_path / "no_tfds_here")
    c.model.num_classes, c.model.label_dropout = 10, 0.1
    c.data.use_prepared = True
    c.corrupt.clean_count, c.corrupt.clean_fraction = 0, 1.0
    c.corrupt.label_flip = 0.25
    c.train.total_images, c.train.num_samples = 32, 10
    with tfds.testing.mock_data(num_examples=16):
        source = load_source(c.data)
        state = run(c, str(tmp_path / "run"))
    assert source.num_classes == 10 and source.labels.shape == (16,)
    assert int(state.step) == 4
    data_dir = str(tmp_path / "run" / "data")
    labels = PreparedDataset(data_dir).clean().labels
    assert prepare.read_manifest(data_dir)["label_flip"]["flipped"] == 4
    assert int(np.sum(labels != source.labels)) == 4
    assert (tmp_path / "run" / "samples" / "final.png").exists()
