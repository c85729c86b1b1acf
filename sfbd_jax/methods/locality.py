"""Ambient-Omni locality (METHODS.md §3.3): σ_max per out-of-distribution image from a crop
classifier, at the crop size the denoiser sees at each σ.

1. *Denoiser*: a model with this config's network trained on the clean group
   (``ambient.locality.denoiser_images`` images, cached and resumable in
   ``<workdir>/annotator/denoiser-<fingerprint>/``), or the checkpoints of an existing run
   (``ambient.locality.denoiser_checkpoint``).
2. *Receptive field*: crop size c(σ) on the annotation grid (``ambient.annotate``), measured
   by ``receptive_field.curve`` on clean images; non-decreasing in σ.
3. *Crop classifier*: the project's encoder (``unet.NoiseClassifier``) told crops of clean
   images (label 0) from crops of the low-quality / out-of-distribution pool (label 1); one
   network for every crop size, conditioned on it (the noise-label input carries ln(c)/4).
   A c×c crop sits in the top-left corner of a zero canvas of the image's size, with one more
   channel marking the crop's pixels (1) against the canvas (0): without it a crop pixel of 0
   looks like canvas, and the encoder's group norms, whose statistics a small crop alone sets
   on a blank canvas, keep little more than the sign of a 1-pixel crop's value. Crops are
   noise-free: noise only makes the pools harder to tell apart, so σ_max is conservative.
4. *σ_max*: for each pool image, P(out-of-distribution) at crop size c(σ_j) for every grid
   level, the mean over ``num_crops`` crops at positions drawn from (seed, image index, size),
   smoothed along the grid like σ_min; σ_max = the largest level σ_j such that every level up to
   it has P < 0.5 + ε; the smallest level when even the smallest crops are told apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sfbd_jax.methods import noise_classifier, receptive_field
from sfbd_jax.models import unet
from sfbd_jax.utils import devices

# ----- crops ----------------------------------------------------------------------------------


def extract_crops(images: np.ndarray, tops: np.ndarray, lefts: np.ndarray, sizes: np.ndarray,
                  canvas: int) -> np.ndarray:
    """(B, canvas, canvas, C + 1): crop b = images[b, tops[b]:tops[b]+sizes[b],
    lefts[b]:lefts[b]+sizes[b]] in the top-left corner of channels 0..C-1, zeros elsewhere;
    channel C is 1 on the crop's pixels and 0 on the canvas. Every crop must lie inside its
    image (ValueError otherwise)."""
    images = np.asarray(images)
    b, h, w, _ = images.shape
    tops, lefts, sizes = (np.asarray(a, np.int64) for a in (tops, lefts, sizes))
    if (sizes < 1).any() or (sizes > canvas).any():
        raise ValueError(f"crop sizes must be in [1, {canvas}], got {sizes.min()}..{sizes.max()}")
    if (tops < 0).any() or (lefts < 0).any() or (tops + sizes > h).any() or \
            (lefts + sizes > w).any():
        raise ValueError(f"a crop reaches outside its ({h}, {w}) image")
    offsets = np.arange(canvas)
    rows = np.minimum(tops[:, None] + offsets, h - 1)  # (B, canvas), clamped where masked
    cols = np.minimum(lefts[:, None] + offsets, w - 1)
    inside = offsets[None, :] < sizes[:, None]  # (B, canvas)
    out = images[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    mask = (inside[:, :, None] & inside[:, None, :])[..., None]  # (B, canvas, canvas, 1)
    return np.concatenate([np.where(mask, out, 0), mask], axis=-1).astype(np.float32)


def canvas_shape(config) -> tuple[int, int, int, int]:
    """(1, H, W, C + 1): one crop canvas as the crop classifier sees it (``extract_crops``)."""
    side = config.data.image_size
    return 1, side, side, config.data.channels + 1


def crop_positions(rng: np.random.Generator, sizes: np.ndarray, height: int, width: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Uniform top-left corners (tops, lefts) for crops of ``sizes`` (every position equally
    likely, the image's borders included)."""
    sizes = np.asarray(sizes, np.int64)
    if (sizes > min(height, width)).any():
        raise ValueError(f"crop size {sizes.max()} is larger than the ({height}, {width}) image")
    tops = rng.integers(0, height - sizes + 1)
    lefts = rng.integers(0, width - sizes + 1)
    return tops, lefts


def size_label(sizes) -> np.ndarray:
    """The crop classifier's conditioning input for crop sizes (pixels): ln(c)/4."""
    return (np.log(np.asarray(sizes, np.float64)) / 4.0).astype(np.float32)


# ----- the crop classifier ------------------------------------------------------------------


def build_classifier(cfg, image_size: int) -> unet.NoiseClassifier:
    """The encoder of ``config.ambient.crop_classifier`` on (image_size, image_size) canvases."""
    return noise_classifier.build_model(cfg, image_size)


def classifier_fingerprint(config, crop_sizes: list[int], data_settings: dict, counts: dict,
                           data_digest: str) -> str:
    record = {"crop_classifier": config.ambient.crop_classifier.to_dict(),
              "crop_sizes": list(map(int, crop_sizes)), "data": data_settings,
              "counts": counts, "image_shape": [config.data.image_size, config.data.channels],
              "shards": data_digest, "canvas": "top-left, zeros, mask channel"}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def train_classifier(config, clean, pool, crop_sizes: list[int], mesh, writer=None
                     ) -> tuple[dict, dict]:
    """Train the crop classifier on crops of ``clean`` (label 0) vs ``pool`` (label 1), both
    (N, H, W, C) row sources in [-1, 1], crop sizes drawn uniformly from ``crop_sizes``.
    Batches are pure functions of (crop_classifier.seed, step). Returns (params, meta)."""
    cfg = config.ambient.crop_classifier
    if len(clean) == 0 or len(pool) == 0:
        raise ValueError("the crop classifier needs clean and out-of-distribution images; got "
                         f"{len(clean)} clean and {len(pool)} in the pool")
    if cfg.batch_size % 2 or cfg.steps <= 0:
        raise ValueError("config.ambient.crop_classifier.batch_size must be even and steps > 0")
    side = config.data.image_size
    sizes = np.asarray(sorted(set(map(int, crop_sizes))), np.int64)
    model = build_classifier(cfg, side)
    key = jax.random.PRNGKey(cfg.seed)
    params = model.init({"params": jax.random.fold_in(key, 0)},
                        jnp.zeros(canvas_shape(config)), jnp.zeros((1,)))
    half = cfg.batch_size // 2

    def batch(i):
        rng = np.random.default_rng([cfg.seed, 0xC0C0, i])
        ci = np.sort(rng.integers(0, len(clean), half))
        pi = np.sort(rng.integers(0, len(pool), half))
        x = np.concatenate([np.asarray(clean[ci], np.float32),
                            np.asarray(pool[pi], np.float32)])
        size = sizes[rng.integers(0, len(sizes), 2 * half)]
        tops, lefts = crop_positions(rng, size, side, side)
        labels = np.concatenate([np.zeros(half), np.ones(half)])
        return extract_crops(x, tops, lefts, size, side), size_label(size), labels

    def logits_fn(params, x, cond):
        return model.apply({"params": params}, x, cond)

    params, meta = noise_classifier.fit_binary(
        logits_fn, params["params"], batch, cfg, mesh, writer, "crop classifier",
        "config.ambient.crop_classifier")
    meta.update(clean=int(len(clean)), pool=int(len(pool)), crop_sizes=sizes.tolist())
    return params, meta


def init_template(config) -> dict:
    model = build_classifier(config.ambient.crop_classifier, config.data.image_size)
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                             jnp.zeros(canvas_shape(config)),
                                             jnp.zeros((1,)))["params"])


def crop_probabilities(config, params: dict, images, indices: np.ndarray,
                       crop_sizes: list[int], mesh) -> np.ndarray:
    """P(out-of-distribution) (N, U) of ``images`` (N, H, W, C) at each of the U distinct
    ``crop_sizes`` (sorted), the mean over ``locality.num_crops`` crops whose positions come
    from (locality.seed, indices[i], size): batching does not change the result. Each
    dispatch holds annotate.batch_size × num_crops crops of one size."""
    cfg, loc = config.ambient.crop_classifier, config.ambient.locality
    side = config.data.image_size
    sizes = np.asarray(sorted(set(map(int, crop_sizes))), np.int64)
    k = int(loc.num_crops)
    if k < 1:
        raise ValueError("config.ambient.locality.num_crops must be >= 1")
    model = build_classifier(cfg, side)
    batch_sh, repl = devices.batch_sharding(mesh), devices.replicated(mesh)
    b = int(config.ambient.annotate.batch_size)
    devices.check_divisible(b, mesh, "config.ambient.annotate.batch_size")

    @functools.partial(jax.jit, out_shardings=repl)
    def probs(params, x, cond):
        return jax.nn.sigmoid(model.apply({"params": params}, x, cond))

    params = jax.device_put(params, repl)
    out = []
    for start in range(0, len(images), b):  # b images → one dispatch of b·k crops per size
        chunk = np.asarray(images[np.arange(start, min(start + b, len(images)))], np.float32)
        n = len(chunk)
        p = np.empty((n, len(sizes)), np.float64)
        for u, s in enumerate(sizes):
            tops, lefts = np.zeros(b * k, np.int64), np.zeros(b * k, np.int64)
            for r, index in enumerate(np.asarray(indices[start:start + n])):
                rng = np.random.default_rng([loc.seed, 0xC207, int(index), int(s)])
                tops[r * k:(r + 1) * k], lefts[r * k:(r + 1) * k] = crop_positions(
                    rng, np.full(k, s), side, side)
            padded = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), np.float32)])
            crops = extract_crops(np.repeat(padded, k, axis=0), tops, lefts, np.full(b * k, s),
                                  side)
            cond = np.full(b * k, size_label([s])[0], np.float32)
            probs_s = np.asarray(jax.device_get(probs(params, jax.device_put(crops, batch_sh),
                                                      jax.device_put(cond, batch_sh))))
            p[:, u] = probs_s[:n * k].reshape(n, k).mean(axis=1)
        out.append(p)
    return np.concatenate(out) if out else np.zeros((0, len(sizes)))


def sigma_max_from_probabilities(probs: np.ndarray, grid: np.ndarray, epsilon: float,
                                 window: int) -> np.ndarray:
    """(N,) σ_max: the largest grid level such that the smoothed P(out-of-distribution) is
    < 0.5 + ε at it and at every smaller level; the smallest level when none is. ``probs``
    (N, S) are per grid level (increasing σ)."""
    smoothed = noise_classifier.smooth(np.asarray(probs, np.float64), window)
    below = smoothed < 0.5 + epsilon
    prefix = np.cumprod(below, axis=1).astype(bool)  # below at this level and every smaller
    last = prefix.sum(axis=1) - 1
    return np.asarray(grid, np.float64)[np.maximum(last, 0)]


def per_level(probs_by_size: np.ndarray, crop_sizes: list[int]) -> np.ndarray:
    """(N, S): the column of each grid level's crop size in ``probs_by_size`` (N, U), U the
    distinct sorted sizes."""
    sizes = sorted(set(map(int, crop_sizes)))
    return probs_by_size[:, [sizes.index(int(c)) for c in crop_sizes]]


# ----- the denoiser whose receptive field is measured ---------------------------------------


def denoiser_dir(config, workdir: str, manifest: dict) -> str:
    from sfbd_jax.data import prepare as prepare_lib

    record = {"model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
              "optim": config.optim.to_dict(), "ema": config.ema.to_dict(),
              "batch_size": config.train.batch_size, "seed": config.ambient.locality.seed,
              "images": config.ambient.locality.denoiser_images,
              "shards": prepare_lib.shards_digest(manifest, ("clean",))}
    fp = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()
                        ).hexdigest()[:16]
    return os.path.join(os.path.abspath(workdir), "annotator", f"denoiser-{fp}")


def denoiser_params(config, workdir: str, clean, writer=None):
    """(experiment, EMA parameters) of the denoiser of ``ambient.locality`` (see the module
    docstring): restored from ``denoiser_checkpoint``, or trained on ``clean`` (resumable) with
    seed ``locality.seed``."""
    from sfbd_jax.data import prepare as prepare_lib
    from sfbd_jax.training import loop
    from sfbd_jax.utils import checkpoints

    loc = config.ambient.locality
    # Its own seed (locality.seed): the annotation belongs to the data, so runs with other
    # training seeds share it.
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.seed = int(loc.seed)
        config.train.total_images = int(loc.denoiser_images)  # its phase length (num_steps)
    experiment = loop.Experiment(config)
    if loc.denoiser_checkpoint:
        directory = os.path.join(os.path.abspath(loc.denoiser_checkpoint), "checkpoints")
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"config.ambient.locality.denoiser_checkpoint={loc.denoiser_checkpoint!r} has "
                "no checkpoints/ folder (give the run directory of a model with this "
                "config's network)")
        ckpt = checkpoints.Checkpointer(directory, enable_async=False)
        try:
            state = ckpt.restore_latest(experiment.abstract_state())
        finally:
            ckpt.close()
        if state is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        logging.info("Locality: the denoiser of %s (step %d).", directory, int(state.step))
        return experiment, state.ema_params
    manifest = prepare_lib.read_manifest(config.corrupt.output_dir)
    directory = denoiser_dir(config, workdir, manifest)
    steps = loop.num_steps(config)  # ≥ 1 dispatch: config_checks.check_ambient
    ckpt = checkpoints.Checkpointer.for_training(os.path.join(directory, "checkpoints"),
                                                 config.train)
    try:
        state = experiment.restore_or_init(ckpt)
        if int(state.step) < steps:
            logging.info("Locality: training the clean denoiser for %d steps in %s.", steps,
                         directory)
            if writer is None:
                from clu import metric_writers

                writer = metric_writers.LoggingWriter()
            state = experiment.train(state, clean, end_step=steps, phase_start_step=0,
                                     data_seed=config.seed, checkpointer=ckpt, writer=writer,
                                     workdir=directory, tag="locality_denoiser")
            if ckpt.latest_step() != int(state.step):
                ckpt.save(int(state.step), state)
    finally:
        ckpt.close()
    return experiment, state.ema_params


# ----- the annotation ------------------------------------------------------------------------


def measure_curve(config, experiment, params, clean, grid: np.ndarray) -> dict:
    """The receptive-field curve of the denoiser on ``locality.num_images`` clean images."""
    loc = config.ambient.locality
    n = min(int(loc.num_images), len(clean))
    if n < 1:
        raise ValueError("the receptive-field measurement needs clean images")
    rows = np.sort(np.random.default_rng([loc.seed, 0x2F]).choice(len(clean), n,
                                                                   replace=False))
    images = np.asarray(clean.images[rows], np.float32)
    labels = (np.asarray(clean.labels[rows], np.int32)
              if config.model.num_classes and clean.labels is not None else None)
    return receptive_field.curve(experiment.denoise, params, images, grid,
                                 jax.random.PRNGKey(loc.seed), float(loc.mass),
                                 int(loc.draws), labels)


def settings(config, workdir: str, manifest: dict) -> dict:
    """What determines a 'crops' annotation (its name in the data manifest), known before any
    work: the denoiser (its fingerprint or checkpoint), the locality, crop-classifier and grid
    settings, and how σ_min is set for high noise."""
    loc = config.ambient.locality
    if loc.denoiser_checkpoint:
        from sfbd_jax.utils import checkpoints

        path = os.path.join(os.path.abspath(loc.denoiser_checkpoint), "checkpoints")
        step = None
        if os.path.isdir(path):
            ckpt = checkpoints.Checkpointer(path, enable_async=False)
            step = ckpt.latest_step()
            ckpt.close()
        denoiser = {"checkpoint": path, "step": step}
    else:
        denoiser = {"trained": os.path.basename(denoiser_dir(config, workdir, manifest))}
    out = {"denoiser": denoiser, "locality": loc.to_dict(),
           "crop_classifier": config.ambient.crop_classifier.to_dict(),
           "annotate": config.ambient.annotate.to_dict(), "high_noise": loc.high_noise}
    out["locality"].pop("denoiser_checkpoint")
    if loc.high_noise == "fixed":
        out["fixed_sigma_min"] = float(config.ambient.fixed_sigma_min)
    return out


def annotate(config, workdir: str, mesh, writer=None, high_noise_sigma_min=None
             ) -> tuple[dict[str, np.ndarray], dict]:
    """σ_max (and σ_min per ``locality.high_noise``) of every low-quality image of the prepared
    data of ``config``: returns (arrays for ``annotations.save``, info for its record: the
    receptive-field curve, the classifier's figures, the mean P per level).
    ``high_noise_sigma_min()`` gives the noise classifier's σ_min ('classifier')."""
    from sfbd_jax.data import prepare as prepare_lib
    from sfbd_jax.data.prepared import PreparedDataset

    loc = config.ambient.locality
    data = PreparedDataset(config.corrupt.output_dir, lazy=True)
    clean = data.clean()
    pool, indices = data.noisy()
    if len(clean) == 0 or len(pool) == 0:
        raise ValueError("annotation 'crops' needs clean (in-distribution) images and a "
                         f"low-quality / out-of-distribution pool; got {len(clean)} clean and "
                         f"{len(pool)} in the pool")
    grid = noise_classifier.sigma_grid(config.ambient.annotate)
    experiment, params = denoiser_params(config, workdir, clean, writer)
    curve = measure_curve(config, experiment, params, clean, grid)
    logging.info("Locality: crop size per σ %s", dict(zip(np.round(grid, 4).tolist(),
                                                         curve["crop_sizes"], strict=True)))
    sizes = curve["crop_sizes"]
    fp = classifier_fingerprint(config, sizes, data.manifest["settings"],
                                data.manifest["counts"], prepare_lib.shards_digest(data.manifest))
    directory = os.path.join(os.path.abspath(workdir), "annotator", f"crops-{fp}")
    loaded = noise_classifier.load(directory, init_template(config))
    if loaded is None:
        logging.info("Training the crop classifier: %d clean vs %d pool images, crop sizes %s.",
                     len(clean), len(pool), sorted(set(sizes)))
        cparams, meta = train_classifier(config, clean.images, pool.images, sizes, mesh, writer)
        noise_classifier.save(directory, cparams, meta)
        devices.sync_processes("crop_classifier")
    else:
        cparams, meta = loaded
    by_size = crop_probabilities(config, cparams, pool.images, indices, sizes, mesh)
    probs = per_level(by_size, sizes)
    cfg = config.ambient.annotate
    sigma_max = sigma_max_from_probabilities(probs, grid, cfg.epsilon, cfg.smooth_window)
    n = len(pool)
    if loc.high_noise == "never":
        sigma_min = np.full(n, np.inf)
    elif loc.high_noise == "fixed":
        sigma_min = np.full(n, float(config.ambient.fixed_sigma_min))
    elif loc.high_noise == "classifier":
        sigma_min = np.asarray(high_noise_sigma_min(), np.float64)
    else:
        raise ValueError(f"config.ambient.locality.high_noise={loc.high_noise!r} is unknown; "
                         "known: 'never', 'fixed', 'classifier'")
    info = {"receptive_field": curve, "crop_classifier": meta, "grid": grid.tolist(),
            "mean_probability_ood": probs.mean(axis=0).tolist()}
    return {"sigma_min": sigma_min, "sigma_max": sigma_max}, info
