"""Checks of a run config that give clear errors before anything is allocated."""

from __future__ import annotations

KNOWN_MODES = ("edm", "sfbd", "ambient")
KNOWN_METRICS = ("fid", "kid", "classifier_fd", "swd", "memorisation", "precision_recall",
                 "density_coverage")


def parse_metrics(spec: str) -> tuple[str, ...]:
    """config.eval.metrics 'fid,kid' → ('fid', 'kid'); unknown names raise ValueError."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"config.eval.metrics has unknown metrics {unknown}; known: "
                         f"{KNOWN_METRICS}")
    return names


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
                 "eval.num_samples", "eval.batch_size", "eval.swd_projections",
                 "eval.kid_subsets", "eval.kid_subset_size"):
        _positive(config, path)
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
