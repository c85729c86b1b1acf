"""Checks of a run config that give clear errors before anything is allocated.

``validate_config`` runs first in every entry point (``run.run``, ``run.run_evaluation``, the
annotate command), before JAX starts or any data is read: every value that can be judged from
the config alone (and the size of an embedded or folder source, which is cheap to know) is
checked here, naming the key.
"""

from __future__ import annotations

import os

KNOWN_MODES = ("edm", "sfbd", "online_sfbd", "ambient")
KNOWN_SOURCES = ("mnist5k", "tfds", "folder")
MNIST5K_SIZE = 5000
CORRUPTION_PARAMS = {"gaussian_noise": ("sigma",), "gaussian_blur": ("sigma_px",),
                     "jpeg": ("quality",), "motion_blur": ("length", "angle_deg"),
                     "folder": ("folder",),
                     "ood": ("ood_classes", "ood_tfds_name", "ood_split"),
                     "mixed": ("mixture", "ood_classes", "ood_tfds_name", "ood_split")}
ANNOTATIONS = ("fixed", "classifier", "file", "every_sigma", "exclude", "crops", "per_type")
HIGH_NOISE = ("never", "fixed", "classifier")
KNOWN_METRICS = ("fid", "kid", "classifier_fd", "swd", "noise", "memorisation",
                 "precision_recall", "density_coverage")


def parse_metrics(spec: str) -> tuple[str, ...]:
    """config.eval.metrics 'fid,kid' → ('fid', 'kid'); unknown names raise ValueError."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"config.eval.metrics has unknown metrics {unknown}; known: "
                         f"{KNOWN_METRICS}")
    return names


def apply_overrides(config, pairs: list[str]) -> dict:
    """Set ``section.key=value`` overrides (a benchmark's ``--set``) on ``config`` in place and
    return them as {dotted key: value}. Values are read as Python literals (``3e-3``,
    ``(1, 2)``, ``True``), else kept as strings; ml_collections then refuses a value of the
    wrong type. A key the config lacks or a pair without ``=`` raises ValueError naming it."""
    import ast

    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r}: expected section.key=value")
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                raise ValueError(f"override {pair!r}: the config has no key {key!r}")
            node = node[part]
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    config.update_from_flattened_dict(overrides)
    return overrides


def _positive(config, path: str) -> None:
    value = config
    for part in path.split("."):
        value = value[part]
    if not value > 0:
        raise ValueError(f"config.{path} must be > 0, got {value!r}")


def validate_config(config) -> None:
    """Raise ValueError naming the first bad key of ``config``."""
    if config.mode not in KNOWN_MODES:
        raise ValueError(f"config.mode={config.mode!r} is unknown; known modes: {KNOWN_MODES}")
    for path in ("data.image_size", "data.channels", "model.base_channels", "model.num_blocks",
                 "model.emb_mult", "diffusion.sigma_data", "sampler.sigma_max",
                 "sampler.sigma_min", "sampler.rho", "optim.lr", "ema.halflife_images",
                 "train.batch_size", "train.total_images", "train.steps_per_dispatch",
                 "train.log_every_steps", "train.checkpoint_every_steps", "train.num_samples",
                 "train.progress_every_secs",
                 "eval.num_samples", "eval.batch_size", "eval.swd_projections",
                 "eval.kid_subsets", "eval.kid_subset_size"):
        _positive(config, path)
    if config.optim.decay_images < 0:
        raise ValueError("config.optim.decay_images must be >= 0 (0 = no decay), got "
                         f"{config.optim.decay_images}")
    if config.train.prefetch_dispatches < 0:
        raise ValueError("config.train.prefetch_dispatches must be >= 0 (0 = no prefetch), got "
                         f"{config.train.prefetch_dispatches}")
    if not config.model.channel_mult:
        raise ValueError("config.model.channel_mult must list at least one level")
    if not 0.0 <= config.model.dropout < 1.0:
        raise ValueError(f"config.model.dropout must lie in [0, 1), got {config.model.dropout}")
    if config.sampler.num_steps < 2:
        raise ValueError(f"config.sampler.num_steps must be >= 2, got {config.sampler.num_steps}")
    if config.sampler.sigma_min >= config.sampler.sigma_max:
        raise ValueError("config.sampler.sigma_min must be below config.sampler.sigma_max")
    if config.model.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError("config.model.compute_dtype must be 'float32' or 'bfloat16' (mixed "
                         f"precision), got {config.model.compute_dtype!r}")
    if not 0.0 <= config.model.label_dropout < 1.0:
        raise ValueError("config.model.label_dropout must lie in [0, 1), got "
                         f"{config.model.label_dropout}")
    conditional = config.model.num_classes > 0
    if config.model.label_dropout > 0 and not conditional:
        raise ValueError("config.model.label_dropout > 0 needs a class-conditional model "
                         "(config.model.num_classes > 0)")
    if config.sampler.guidance != 1.0 and not config.model.label_dropout > 0:
        raise ValueError(f"config.sampler.guidance={config.sampler.guidance} needs a model "
                         "trained with label dropout (config.model.label_dropout > 0): the "
                         "unconditional denoiser is its null class")
    if config.cep.kind not in ("none", "uniform", "gaussian"):
        raise ValueError(f"config.cep.kind={config.cep.kind!r} is unknown; known: 'none', "
                         "'uniform', 'gaussian'")
    if config.cep.kind != "none" and not conditional:
        raise ValueError("config.cep.kind perturbs the class embedding: it needs a "
                         "class-conditional model (config.model.num_classes > 0)")
    if config.cep.gamma < 0:
        raise ValueError(f"config.cep.gamma must be >= 0, got {config.cep.gamma}")
    if config.data.prepared_group not in ("clean", "noisy"):
        raise ValueError(f"config.data.prepared_group={config.data.prepared_group!r} is "
                         "unknown; known: 'clean', 'noisy'")
    parse_metrics(config.eval.metrics)
    for path in ("eval.pr_k", "eval.dc_k", "eval.prdc_max", "eval.heldout_max",
                 "eval.block_elements"):
        _positive(config, path)
    if not 0.0 < config.eval.memorisation_threshold <= 1.0:
        raise ValueError("config.eval.memorisation_threshold (on d1/d2) must lie in (0, 1], got "
                         f"{config.eval.memorisation_threshold}")
    if config.eval.copy_pairs < 0:
        raise ValueError(f"config.eval.copy_pairs must be >= 0, got {config.eval.copy_pairs}")
    if config.eval.round_num_samples < 0:
        raise ValueError("config.eval.round_num_samples must be >= 0 (0 = no per-round metrics)")
    if config.train.total_images < config.train.batch_size:
        raise ValueError("config.train.total_images is smaller than one batch "
                         f"({config.train.total_images} < {config.train.batch_size})")
    check_data(config)
    if config.mode in ("sfbd", "online_sfbd", "ambient") or config.data.use_prepared:
        check_corruption(config)
    if config.mode == "sfbd":
        check_sfbd(config)
    if config.mode == "online_sfbd":
        check_online(config)
    if config.mode == "ambient":
        check_ambient(config)


def source_size(data) -> int | None:
    """Images in the source of ``config.data`` when that is cheap to know (the embedded
    MNIST-5k, an image folder: a directory listing), after ``data.subset``; None for tfds."""
    if data.source == "mnist5k":
        n = MNIST5K_SIZE
    elif data.source == "folder":
        if not data.folder or not os.path.isdir(data.folder):
            raise FileNotFoundError(f"config.data.folder={data.folder!r} is not a directory "
                                    "(source 'folder' reads the images under it)")
        from sfbd_jax.data.sources import IMAGE_SUFFIXES

        n = sum(name.lower().endswith(IMAGE_SUFFIXES)
                for _, _, names in os.walk(data.folder) for name in names)
        if n == 0:
            raise FileNotFoundError(f"config.data.folder={data.folder!r} holds no images "
                                    f"({', '.join(IMAGE_SUFFIXES)})")
    else:
        return None
    if data.subset:
        if not 0 < data.subset <= n:
            raise ValueError(f"config.data.subset={data.subset} must lie in 1..{n} (the size "
                             f"of the {data.source} source)")
        return int(data.subset)
    return n


def check_data(config) -> None:
    data = config.data
    if data.source not in KNOWN_SOURCES:
        raise ValueError(f"config.data.source={data.source!r} is unknown; known: "
                         f"{KNOWN_SOURCES}")
    if data.source == "tfds" and not data.tfds_name:
        raise ValueError("config.data.source='tfds' needs config.data.tfds_name (e.g. "
                         "'cifar10')")
    if data.source == "tfds" and data.subset:
        raise ValueError("config.data.subset applies to the in-memory sources (mnist5k, "
                         "folder); for tfds slice the split, e.g. --config.data.split="
                         "'train[:10%]'")
    if data.source == "folder" and data.channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 or 3 for an image folder, got "
                         f"{data.channels}")
    if data.unreadable_files not in ("refuse", "skip"):
        raise ValueError(f"config.data.unreadable_files={data.unreadable_files!r} is unknown; "
                         "known: 'refuse', 'skip'")
    if data.center_crop < 0:
        raise ValueError(f"config.data.center_crop must be >= 0, got {data.center_crop}")
    if data.subset < 0:
        raise ValueError(f"config.data.subset must be >= 0 (0 = all), got {data.subset}")


def check_corruption(config) -> None:
    """The keys of config.corrupt (used by every mode that prepares a data set)."""
    c = config.corrupt
    if c.type not in CORRUPTION_PARAMS:
        raise ValueError(f"config.corrupt.type={c.type!r} is unknown; known: "
                         f"{sorted(CORRUPTION_PARAMS)}")
    if c.dtype not in ("float32", "float16"):
        raise ValueError(f"config.corrupt.dtype must be 'float32' or 'float16', got {c.dtype!r}")
    checks = {"sigma": (c.sigma >= 0, "must be >= 0 (σ_ζ on the [-1, 1] scale)"),
              "sigma_px": (c.sigma_px >= 0, "must be >= 0 pixels"),
              "quality": (1 <= c.quality <= 95, "must lie in 1..95"),
              "length": (c.length >= 1, "must be >= 1 pixel")}
    for key in CORRUPTION_PARAMS[c.type]:
        if key in checks and not checks[key][0]:
            raise ValueError(f"config.corrupt.{key}={c[key]!r} {checks[key][1]} (corruption "
                             f"{c.type!r})")
    has_pool = c.type == "ood"
    if c.type == "mixed":
        from sfbd_jax.corruptions import parse_mixture

        has_pool = any(m["type"] == "ood" for m in parse_mixture(c.mixture))
    if has_pool:
        if bool(c.ood_classes) == bool(c.ood_tfds_name):
            raise ValueError("an out-of-distribution pool needs exactly one source: "
                             "corrupt.ood_classes (other classes of config.data's source) or "
                             "corrupt.ood_tfds_name (another tfds data set)")
        overlap = set(map(int, c.ood_classes)) & set(map(int, config.data.classes))
        if overlap:
            raise ValueError(f"config.corrupt.ood_classes and config.data.classes share "
                             f"{sorted(overlap)}: the pool must be out of the target classes")
    if c.type == "folder" and not c.folder:
        raise ValueError("config.corrupt.type='folder' needs config.corrupt.folder (a directory "
                         "of low-quality images)")
    if not 0.0 <= c.label_flip < 1.0:
        raise ValueError(f"config.corrupt.label_flip must lie in [0, 1), got {c.label_flip}")
    if c.label_flip and config.data.source == "folder":
        raise ValueError("config.corrupt.label_flip > 0 needs a labelled data source; "
                         "an image folder has no labels")
    if c.shard_size <= 0:
        raise ValueError(f"config.corrupt.shard_size must be > 0, got {c.shard_size}")
    if c.clean_count < 0 or not 0.0 <= c.clean_fraction <= 1.0:
        raise ValueError("config.corrupt.clean_count must be >= 0 and clean_fraction in [0, 1]; "
                         f"got {c.clean_count} and {c.clean_fraction}")
    n = source_size(config.data)
    if n is not None and c.clean_count > n:
        raise ValueError(f"config.corrupt.clean_count={c.clean_count} exceeds the "
                         f"{n} images of the source (config.data.source={config.data.source!r}"
                         f"{', subset' if config.data.subset else ''})")


def check_sfbd(config) -> None:
    """The keys of config.sfbd (and the corruption SFBD can invert)."""
    cfg = config.sfbd
    if cfg.rounds < 0 or cfg.clean_repeat < 1:
        raise ValueError("config.sfbd.rounds must be >= 0 and config.sfbd.clean_repeat >= 1")
    _check_backward(config)
    dispatch = config.train.batch_size * config.train.steps_per_dispatch
    if cfg.rounds and cfg.images_per_round < dispatch:
        raise ValueError("config.sfbd.images_per_round must be at least one dispatch of "
                         f"config.train.batch_size images ({dispatch})")
    if cfg.denoise_shard_size <= 0 or cfg.denoise_shard_size % cfg.denoise_batch_size:
        raise ValueError(f"config.sfbd.denoise_shard_size={cfg.denoise_shard_size} must be a "
                         f"positive multiple of config.sfbd.denoise_batch_size="
                         f"{cfg.denoise_batch_size}")


def _check_backward(config) -> None:
    """What SFBD and online SFBD share: Gaussian noise to invert, pretraining, the backward
    step's grid."""
    if config.sfbd.denoised_dtype not in ("float16", "float32"):
        raise ValueError(f"config.sfbd.denoised_dtype must be 'float16' or 'float32', got "
                         f"{config.sfbd.denoised_dtype!r}")
    cfg = config.sfbd
    if config.corrupt.type != "gaussian_noise":
        raise ValueError(f"{config.mode} deconvolves additive Gaussian noise: "
                         f"config.corrupt.type must be 'gaussian_noise', got "
                         f"{config.corrupt.type!r}")
    dispatch = config.train.batch_size * config.train.steps_per_dispatch
    if cfg.pretrain_images < dispatch:
        raise ValueError("config.sfbd.pretrain_images must be at least one dispatch of "
                         f"config.train.batch_size images ({dispatch})")
    if cfg.backward_num_steps < 1 or cfg.denoise_batch_size <= 0:
        raise ValueError("config.sfbd.backward_num_steps and denoise_batch_size must be > 0")
    if cfg.backward not in ("ode", "dps"):
        raise ValueError(f"config.sfbd.backward must be 'ode' (SFBD) or 'dps' (EMDiffusion's "
                         f"E-step), got {cfg.backward!r}")
    if cfg.backward == "dps":
        if cfg.dps_num_steps < 2:
            raise ValueError(f"config.sfbd.dps_num_steps must be at least 2, got "
                             f"{cfg.dps_num_steps}")
        if cfg.dps_guidance not in ("normalized", "likelihood"):
            raise ValueError(f"config.sfbd.dps_guidance must be 'normalized' or 'likelihood', "
                             f"got {cfg.dps_guidance!r}")
        if not cfg.dps_zeta >= 0:
            raise ValueError(f"config.sfbd.dps_zeta must be ≥ 0, got {cfg.dps_zeta}")
        if cfg.dps_prior_variance and cfg.dps_guidance != "likelihood":
            raise ValueError("config.sfbd.dps_prior_variance applies to dps_guidance "
                             "'likelihood' only")


def noisy_count(config) -> int | None:
    """Images in the noisy group of the prepared data set, when the source size is cheap to
    know (see ``source_size``); None otherwise."""
    n = source_size(config.data)
    if n is None:
        return None
    c = config.corrupt
    clean = c.clean_count if c.clean_count > 0 else int(round(c.clean_fraction * n))
    return n - clean


def check_online(config) -> None:
    """The keys of config.online (online SFBD) and what it shares with SFBD."""
    _check_backward(config)
    o, t = config.online, config.train
    if o.refresh_every_steps < 1:
        raise ValueError("config.online.refresh_every_steps (m) must be >= 1, got "
                         f"{o.refresh_every_steps}")
    if o.refresh_every_steps % t.steps_per_dispatch:
        raise ValueError(f"config.online.refresh_every_steps={o.refresh_every_steps} must be a "
                         f"multiple of config.train.steps_per_dispatch={t.steps_per_dispatch} "
                         "(a refresh happens between dispatches)")
    if o.denoise_with not in ("ema", "params"):
        raise ValueError(f"config.online.denoise_with must be 'ema' or 'params', got "
                         f"{o.denoise_with!r}")
    if o.eval_every_steps < 0 or o.eval_every_steps % t.steps_per_dispatch:
        raise ValueError(f"config.online.eval_every_steps={o.eval_every_steps} must be 0 or a "
                         "positive multiple of config.train.steps_per_dispatch="
                         f"{t.steps_per_dispatch}")
    if o.refresh_count < 1:
        raise ValueError(f"config.online.refresh_count must be >= 1, got {o.refresh_count}")
    noisy = noisy_count(config)
    if noisy is not None and o.refresh_count > noisy:
        raise ValueError(f"config.online.refresh_count={o.refresh_count} is larger than the "
                         f"noisy set ({noisy} images): a refresh would denoise an image twice")
    if o.ramp_start < 0 or o.ramp_end < o.ramp_start:
        raise ValueError(f"config.online.ramp_end={o.ramp_end} must be >= ramp_start="
                         f"{o.ramp_start} >= 0 (online steps)")
    if not 0.0 <= o.clean_share < 1.0:
        raise ValueError(f"config.online.clean_share must lie in [0, 1), got {o.clean_share}")
    if o.refresh_rule not in ("fixed", "adaptive"):
        raise ValueError(f"config.online.refresh_rule must be 'fixed' or 'adaptive', got "
                         f"{o.refresh_rule!r}")
    if o.adaptive_features not in ("pixels", "inception"):
        raise ValueError("config.online.adaptive_features must be 'pixels' or 'inception', got "
                         f"{o.adaptive_features!r}")
    if (o.refresh_rule == "adaptive" and o.adaptive_features == "inception"
            and not config.eval.inception_weights):
        raise ValueError("config.online.adaptive_features='inception' needs "
                         "config.eval.inception_weights (the converted FID Inception weights)")
    if o.refresh_rule == "adaptive" and noisy is not None:
        clean = source_size(config.data) - noisy
        if clean < 2:
            raise ValueError("config.online.refresh_rule='adaptive' compares with the clean "
                             f"subset by KID, which needs at least 2 clean images ({clean})")
    if o.train_images < t.batch_size * t.steps_per_dispatch:
        raise ValueError("config.online.train_images must be at least one dispatch of "
                         f"config.train.batch_size images ({t.batch_size * t.steps_per_dispatch})")


def _check_classifier(config, k, where: str) -> None:
    if k.batch_size <= 0 or k.batch_size % 2 or k.steps <= 0:
        raise ValueError(f"{where}.batch_size must be even and > 0, and steps > 0")
    levels = len(k.channel_mult)
    if config.data.image_size % 2 ** (levels - 1):
        raise ValueError(f"image size {config.data.image_size} is not divisible by "
                         f"2**(levels-1) for {where}.channel_mult={tuple(k.channel_mult)}")


def check_ambient(config) -> None:
    """The keys of config.ambient, including its classifier and annotation grid."""
    a = config.ambient
    if a.annotation not in ANNOTATIONS:
        raise ValueError(f"config.ambient.annotation={a.annotation!r} is unknown; known: "
                         f"{ANNOTATIONS}")
    if a.annotation == "file" and not os.path.isfile(a.annotation_file or ""):
        raise FileNotFoundError(f"config.ambient.annotation_file={a.annotation_file!r} is not a "
                                "file (annotation 'file' reads σ_min from it)")
    if a.fixed_sigma_min < 0 or a.fixed_sigma_max < 0:
        raise ValueError("config.ambient.fixed_sigma_min and fixed_sigma_max must be >= 0")
    if not a.s_max > 1.0:
        raise ValueError(f"config.ambient.s_max must be > 1, got {a.s_max}")
    if a.annotation == "per_type":
        if config.corrupt.type != "mixed":
            raise ValueError("config.ambient.annotation='per_type' needs "
                             "config.corrupt.type='mixed'")
        values = [*a.type_sigma_min, *a.type_sigma_max]
        if not a.type_sigma_min or any(not v >= 0 for v in values):
            raise ValueError("config.ambient.type_sigma_min must list a σ_min >= 0 (inf = "
                             "never at high noise) per mixture component, type_sigma_max >= 0")
    crops = a.annotation == "crops"
    if crops:
        loc = a.locality
        _check_classifier(config, a.crop_classifier, "config.ambient.crop_classifier")
        if loc.high_noise not in HIGH_NOISE:
            raise ValueError(f"config.ambient.locality.high_noise={loc.high_noise!r} is "
                             f"unknown; known: {HIGH_NOISE}")
        if not 0.0 < loc.mass <= 1.0:
            raise ValueError(f"config.ambient.locality.mass must be in (0, 1], got {loc.mass}")
        if loc.num_images < 1 or loc.draws < 1 or loc.num_crops < 1:
            raise ValueError("config.ambient.locality.num_images, draws and num_crops must be "
                             ">= 1")
        if not loc.denoiser_checkpoint and loc.denoiser_images < (
                config.train.batch_size * config.train.steps_per_dispatch):
            raise ValueError("config.ambient.locality.denoiser_images must cover at least one "
                             "dispatch of config.train.batch_size images (or set "
                             "locality.denoiser_checkpoint)")
    if a.annotation == "classifier" or (crops and a.locality.high_noise == "classifier"):
        _check_classifier(config, a.classifier, "config.ambient.classifier")
    if a.annotation == "classifier" or crops:
        g = a.annotate
        if not (0 < g.sigma_lo < g.sigma_hi and g.num_sigmas >= 2):
            raise ValueError("config.ambient.annotate needs 0 < sigma_lo < sigma_hi and "
                             "num_sigmas >= 2")
        if g.smooth_window < 1 or g.smooth_window % 2 == 0:
            raise ValueError("config.ambient.annotate.smooth_window must be odd and >= 1, got "
                             f"{g.smooth_window}")
        if g.num_draws < 1 or g.batch_size <= 0:
            raise ValueError("config.ambient.annotate.num_draws and batch_size must be > 0")
