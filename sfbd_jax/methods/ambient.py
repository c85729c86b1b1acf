"""Ambient Diffusion Omni driver (``mode=ambient``, METHODS.md §3): train one EDM model on
clean ∪ low-quality images, each low-quality image only at the noise levels its annotation
allows (data/eligibility.py), with the ambient loss where the data carry known noise σ_n.

Steps, each resumable: prepare the mixed data set (config.corrupt: a corruption of the
library, or corrupt.type='folder' for a folder of low-quality images) → annotate the
low-quality images (config.ambient.annotation) and save the annotation with the data
manifest → train → samples, and with ``eval.round_num_samples > 0`` the distribution metrics.

``config.ambient.annotation``:
    'fixed'        σ_min = ambient.fixed_sigma_min for every low-quality image
    'classifier'   σ_min from the noise-conditional classifier (noise_classifier.py), trained
                   first if not cached in <workdir>/annotator/
    'file'         per-image sigma_min [, sigma_max, sigma_n] from ambient.annotation_file (.npz,
                   aligned with the prepared low-quality group: noisy/indices-*.npy)
    'every_sigma'  σ_min = 0: low-quality images at every level (the naive baseline)
    'exclude'      σ_min = ∞: clean images only (the clean-only baseline, same code path)
    'per_type'     a mixed-corruption set: σ_min (and σ_max) of each image's component, from
                   ambient.type_sigma_min / type_sigma_max
    'crops'        σ_max per image from the crop classifier at the denoiser's receptive field
                   per σ (locality.py; the curve is plotted beside the annotation), σ_min per
                   ambient.locality.high_noise ('never', 'fixed' or 'classifier')
With Gaussian-noise data and ``ambient.known_noise``, σ_n = σ_ζ and σ_min is raised to σ_ζ:
the ambient loss on the noisy data, i.e. the TweedieDiff baseline of SFBD.

Run directory: checkpoints/, samples/, annotator/<fingerprint>/ (classifier), data/ (when
config.corrupt.output_dir is empty), ambient_summary.json.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
from absl import logging
from clu import metric_writers

from sfbd_jax import config_checks
from sfbd_jax.data import annotations as annotations_lib
from sfbd_jax.data import eligibility, pipeline, rows
from sfbd_jax.data import prepare as prepare_lib
from sfbd_jax.data.prepared import PreparedDataset
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.evaluation import evaluator as evaluator_lib
from sfbd_jax.evaluation import training_sets
from sfbd_jax.methods import locality, noise_classifier, receptive_field
from sfbd_jax.training import loop
from sfbd_jax.training.state import TrainState
from sfbd_jax.utils import checkpoints, devices, jsonfile

SUMMARY = "ambient_summary.json"
ANNOTATIONS = config_checks.ANNOTATIONS


def known_noise_level(config, manifest: dict) -> float:
    """σ_n of the low-quality images: σ_ζ for Gaussian-noise data with ambient.known_noise,
    else 0."""
    corruption = manifest["settings"]["corruption"]
    if config.ambient.known_noise and corruption["type"] == "gaussian_noise":
        return float(corruption["sigma"])
    return 0.0


def known_noise_levels(config, data: PreparedDataset) -> np.ndarray:
    """(N_low_quality,) σ_n per image: ``known_noise_level``, or in a mixed set σ of its
    gaussian_noise components (with ambient.known_noise) and 0 for the others."""
    n = int(data.manifest["counts"]["noisy"])
    types = data.noisy_types()
    if types is None:
        return np.full(n, known_noise_level(config, data.manifest))
    per_type = np.asarray([float(m["sigma"]) if m["type"] == "gaussian_noise" and
                           config.ambient.known_noise else 0.0
                           for m in data.manifest["mixture"]])
    return per_type[types]


def per_type_annotation(config, data: PreparedDataset) -> dict[str, np.ndarray]:
    """Annotation 'per_type': σ_min (and σ_max) of each image of a mixed set from its
    component, ambient.type_sigma_min / type_sigma_max listed in the mixture's order."""
    types = data.noisy_types()
    if types is None:
        raise ValueError("config.ambient.annotation='per_type' needs a mixed-corruption data "
                         "set (config.corrupt.type='mixed')")
    mixture = data.manifest["mixture"]
    out = {}
    for key, values in (("sigma_min", config.ambient.type_sigma_min),
                        ("sigma_max", config.ambient.type_sigma_max)):
        if key == "sigma_max" and not values:
            continue
        if len(values) != len(mixture):
            raise ValueError(
                f"config.ambient.type_{key} lists {len(values)} values; the data set's mixture "
                f"has {len(mixture)} components ({', '.join(m['type'] for m in mixture)})")
        out[key] = np.asarray(values, np.float64)[types]
    return out


def classifier_dir(config, workdir: str, manifest: dict) -> str:
    fp = noise_classifier.fingerprint(config, manifest["settings"], manifest["counts"],
                                      prepare_lib.shards_digest(manifest))
    return os.path.join(os.path.abspath(workdir), "annotator", fp)


def train_classifier(config, workdir: str, mesh, writer=None) -> tuple[dict, dict]:
    """Train (or load, when already trained with these settings) the noise-conditional
    classifier on the prepared data of ``config``; returns (params, meta)."""
    data = PreparedDataset(config.corrupt.output_dir, lazy=True)  # batches read their rows
    directory = classifier_dir(config, workdir, data.manifest)
    loaded = noise_classifier.load(directory, noise_classifier.init_template(config))
    if loaded is not None:
        logging.info("Noise classifier loaded from %s.", directory)
        return loaded
    clean = data.clean().images
    bad, _ = data.noisy()
    logging.info("Training the noise classifier: %d clean vs %d low-quality images.",
                 len(clean), len(bad))
    params, meta = noise_classifier.train(config, clean, bad.images, mesh, writer)
    noise_classifier.save(directory, params, meta)
    devices.sync_processes("noise_classifier")
    logging.info("Noise classifier saved in %s (final BCE %.4f, accuracy %.3f).", directory,
                 meta["final_bce"], meta["final_accuracy"])
    return params, meta


def annotation_settings(config, manifest: dict, workdir: str) -> tuple[str, dict]:
    """(method, the settings that determine its σ_min values)."""
    method = config.ambient.annotation
    if method not in ANNOTATIONS:
        raise ValueError(f"config.ambient.annotation={method!r} is unknown; known: "
                         f"{ANNOTATIONS}")
    settings: dict = {}
    if method == "fixed":
        settings = {"sigma_min": float(config.ambient.fixed_sigma_min),
                    "sigma_max": float(config.ambient.fixed_sigma_max)}
    elif method == "classifier":
        settings = {"classifier": os.path.basename(classifier_dir(config, workdir, manifest)),
                    "annotate": config.ambient.annotate.to_dict()}
    elif method == "per_type":
        settings = {"sigma_min": [float(v) for v in config.ambient.type_sigma_min],
                    "sigma_max": [float(v) for v in config.ambient.type_sigma_max],
                    "mixture": manifest.get("mixture")}
    elif method == "crops":
        settings = locality.settings(config, workdir, manifest)
        if config.ambient.locality.high_noise == "classifier":
            settings["classifier"] = os.path.basename(classifier_dir(config, workdir, manifest))
    elif method == "file":
        path = os.path.abspath(config.ambient.annotation_file or "")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config.ambient.annotation='file' but "
                                    f"config.ambient.annotation_file={path!r} is not a file")
        with open(path, "rb") as f:
            settings = {"file": path, "sha256": hashlib.sha256(f.read()).hexdigest()}
    return method, settings


def read_annotation_file(path: str, count: int) -> dict[str, np.ndarray]:
    """sigma_min [, sigma_max, sigma_n] from a user's .npz, each (count,)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k], np.float64) for k in f.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the annotation file {path}: {err}") from err
    unknown = set(arrays) - set(annotations_lib.ARRAYS)
    if "sigma_min" not in arrays or unknown:
        raise ValueError(f"the annotation file {path} must hold sigma_min [, sigma_max, "
                         f"sigma_n]; it holds {sorted(arrays)}")
    for key, a in arrays.items():
        if a.shape != (count,):
            raise ValueError(f"{path}: {key} has shape {a.shape}; the low-quality group holds "
                             f"{count} images")
    return arrays


def annotate(config, workdir: str, mesh, writer=None) -> str:
    """Annotate the low-quality images of the prepared data (no-op when this annotation is
    already saved); returns the annotation's name in the data manifest."""
    data_dir = config.corrupt.output_dir
    manifest = prepare_lib.read_manifest(data_dir)
    method, settings = annotation_settings(config, manifest, workdir)
    name = annotations_lib.annotation_name(method, settings)
    if annotations_lib.record(data_dir, name) is not None:
        return name
    n = int(manifest["counts"]["noisy"])
    arrays: dict[str, np.ndarray] = {}
    info: dict = {}
    if method == "fixed":
        if config.ambient.fixed_sigma_min < 0 or config.ambient.fixed_sigma_max < 0:
            raise ValueError("config.ambient.fixed_sigma_min and fixed_sigma_max must be >= 0")
        arrays["sigma_min"] = np.full(n, settings["sigma_min"])
        if settings["sigma_max"] > 0:
            arrays["sigma_max"] = np.full(n, settings["sigma_max"])
    elif method == "file":
        arrays = read_annotation_file(settings["file"], n)
    elif method == "every_sigma":
        arrays["sigma_min"] = np.zeros(n)
    elif method == "per_type":
        arrays = per_type_annotation(config, PreparedDataset(data_dir, lazy=True))
    elif method == "exclude":
        arrays["sigma_min"] = np.full(n, np.inf)
    elif method == "crops":
        arrays, info = locality.annotate(
            config, workdir, mesh, writer,
            high_noise_sigma_min=lambda: classifier_sigma_min(config, workdir, mesh, writer)[0])
    else:
        arrays["sigma_min"], info = classifier_sigma_min(config, workdir, mesh, writer)
    annotations_lib.save(data_dir, method, settings, arrays, info)
    if method == "crops" and jax.process_index() == 0:
        receptive_field.plot(info["receptive_field"], os.path.join(
            data_dir, "annotations", name, "receptive_field.png"),
            f"receptive field of the denoiser ({name})")
    devices.sync_processes("annotations")
    record = annotations_lib.record(data_dir, name)
    logging.info("Annotation %s of %d low-quality images: %s", name, n, record["summary"])
    return name


def classifier_sigma_min(config, workdir: str, mesh, writer=None) -> tuple[np.ndarray, dict]:
    """σ_min (N_low_quality,) from the noise-conditional classifier (trained first when not
    cached) and the facts for the annotation record."""
    params, meta = train_classifier(config, workdir, mesh, writer)
    bad, indices = PreparedDataset(config.corrupt.output_dir, lazy=True).noisy()
    cfg = config.ambient.annotate
    logging.info("Annotating %d low-quality images over %d levels × %d draws.", len(bad),
                 cfg.num_sigmas, cfg.num_draws)
    probs = noise_classifier.probabilities(config, params, bad.images, indices, mesh)
    grid = noise_classifier.sigma_grid(cfg)
    sigma_min = noise_classifier.sigma_min_from_probabilities(probs, grid, cfg.epsilon,
                                                              cfg.smooth_window)
    return sigma_min, {"classifier": meta, "grid": grid.tolist(),
                       "mean_probability": probs.mean(axis=0).tolist()}


def training_set(config, workdir: str, mesh, writer=None
                 ) -> tuple[ImageDataset, eligibility.Annotations, dict]:
    """clean ∪ low-quality images with their annotations, and facts for the summary.

    The images are an index-level union of the memory-mapped shards (``rows.ConcatenatedRows``):
    batches read their own rows; values are checked per batch (``facts['sigma_n'] > 0``:
    noisy values, unclipped, are checked to be finite only)."""
    name = annotate(config, workdir, mesh, writer)
    data = PreparedDataset(config.corrupt.output_dir, lazy=True)
    clean = data.clean()
    bad, _ = data.noisy()
    stored = annotations_lib.load(config.corrupt.output_dir, name)
    n_bad = len(bad)
    sigma_n = stored.get("sigma_n")
    if sigma_n is None:
        sigma_n = known_noise_levels(config, data)
    sigma_min = np.maximum(stored["sigma_min"], sigma_n)  # never below the data's own noise
    bad_ann = eligibility.Annotations.make(sigma_min, stored.get("sigma_max"), sigma_n)
    clean_ann = eligibility.Annotations.make(np.zeros(len(clean)))
    ann = eligibility.Annotations.concatenate([clean_ann, bad_ann])
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    for part in (clean, bad):
        if len(part):
            pipeline.validate_images(part.images, shape, part.name, check_values=False)
    parts = [p.images for p in (clean, bad) if len(p)]
    images = rows.ConcatenatedRows(parts, name="clean+low_quality")
    labels = (np.concatenate([clean.labels, bad.labels])
              if clean.labels is not None and bad.labels is not None else None)
    dataset = ImageDataset(images, labels, clean.num_classes, "clean+low_quality")
    facts = {"annotation": name, "clean": len(clean), "low_quality": n_bad,
             "sigma_n": float(sigma_n.max(initial=0.0)),
             "annotation_summary": annotations_lib.summary(sigma_min, stored.get("sigma_max"))}
    types = data.noisy_types()
    if types is not None:
        facts["annotation_by_type"] = summary_by_type(
            data.manifest["mixture"], types, sigma_min, stored.get("sigma_max"))
    return dataset, ann, facts


def summary_by_type(mixture: list[dict], types: np.ndarray, sigma_min: np.ndarray,
                    sigma_max: np.ndarray | None) -> dict[str, dict]:
    """A mixed set's annotation summary per component ('<index>:<type>' in the mixture's
    order): which corruption the annotation finds usable at which σ."""
    out = {}
    for i, component in enumerate(mixture):
        mine = types == i
        out[f"{i}:{component['type']}"] = annotations_lib.summary(
            sigma_min[mine], None if sigma_max is None else np.asarray(sigma_max)[mine])
    return out


def low_quality_share(sampler: eligibility.EligibleSampler, n_clean: int, seed: int,
                      draws: int = 20_000) -> float:
    """Expected fraction of batch elements that are low-quality images."""
    _, index = sampler.draw(np.random.default_rng([seed, 0x5A4E]), draws)
    return float(np.mean(index >= n_clean))


def run_ambient(config, workdir: str) -> TrainState:
    """Entry for config.mode == 'ambient' (see the module docstring)."""
    workdir = os.path.abspath(workdir)
    config = prepare_lib.with_output_dir(config, workdir)
    experiment = loop.Experiment(config)
    evaluator = (evaluator_lib.Evaluator(config, experiment.mesh)
                 if config.eval.round_num_samples > 0 else None)
    eligibility.safety_factor(config.ambient.s_max)  # a bad s_max fails before any work
    loop.write_run_config(config, workdir)
    prepare_lib.prepare_on_main_process(config)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    dataset, ann, facts = training_set(config, workdir, experiment.mesh, writer)
    d = config.diffusion
    batches = eligibility.AmbientBatches(
        dataset, ann, s_max=config.ambient.s_max, p_mean=d.p_mean, p_std=d.p_std,
        batch_size=config.train.batch_size, steps_per_dispatch=config.train.steps_per_dispatch,
        seed=config.seed, mesh=experiment.mesh, num_classes=config.model.num_classes,
        random_flip=config.data.random_flip, unclipped=facts["sigma_n"] > 0)
    facts["low_quality_share"] = low_quality_share(batches.sampler, facts["clean"], config.seed)
    logging.info("Ambient-Omni: %d clean + %d low-quality images (annotation %s, σ_n = %g); "
                 "low-quality share of the batches %.3f.", facts["clean"],
                 facts["low_quality"], facts["annotation"], facts["sigma_n"],
                 facts["low_quality_share"])
    ckpt = checkpoints.Checkpointer.for_training(os.path.join(workdir, "checkpoints"),
                                                 config.train)
    try:
        state = experiment.restore_or_init(ckpt)
        with metric_writers.ensure_flushes(writer):
            state = experiment.train(state, dataset, end_step=loop.num_steps(config),
                                     phase_start_step=0, data_seed=config.seed,
                                     checkpointer=ckpt, writer=writer, workdir=workdir,
                                     tag="ambient", batches=batches)
            facts["samples"] = experiment.write_samples(state, workdir, writer, "final")
    finally:
        ckpt.close()
    facts.update(step=int(state.step), images_seen=int(state.images_seen),
                 train_loss=loop.phase_end_loss(workdir, "ambient", int(state.step)))
    if evaluator is not None:
        result = evaluator.evaluate_model(
            experiment, state.ema_params, config.eval.round_num_samples,
            evaluator_lib.evaluation_key(config),
            train=training_sets.run_training_images(config, workdir),
            copies_path=os.path.join(workdir, "eval", "copies_final.png"))
        facts.update(evaluator_lib.without_timings(result))
        writer.write_scalars(int(state.step), {f"ambient/{k}": v for k, v in facts.items()
                                               if isinstance(v, float)})
    if jax.process_index() == 0:
        jsonfile.write_json(os.path.join(workdir, SUMMARY), facts)
    logging.info("Ambient-Omni summary: %s", facts)
    return state
