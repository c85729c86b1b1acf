"""Ambient Diffusion Omni on the embedded MNIST-5k digits, tiny CPU network (METHODS.md §3).

10% of the digits (500) stay clean; the other 90% are low quality. Variants
(``--config configs/ambient_mnist.py:VARIANT``):
  'blur'    (default) Gaussian blur σ_B = 1.0 px
  'jpeg'    JPEG quality 15
  'motion'  motion blur over 5 px
  'noise'   additive Gaussian noise σ_ζ = 0.2 with the ambient loss (σ_n known): TweedieDiff,
            the baseline of SFBD
  'smoke'   a tiny network and budget (the test suite)
Choose how σ_min is set with --config.ambient.annotation=fixed|classifier|every_sigma|exclude.
Fixed σ_min: for 'blur' the median σ_min the noise-conditional classifier found on these
digits (1.7; its 10–90% range 1.3–2.2, benchmarks/RESULTS.md). For 'jpeg' and 'motion' the
value is a placeholder, not measured: run `python -m sfbd_jax.annotate ... --step=annotate
--config.ambient.annotation=classifier` and use the median it logs.
"""

from configs import default


def get_config(variant: str = "blur"):
    c = default.get_config()
    c.mode = "ambient"
    c.corrupt.clean_count = 0
    c.corrupt.clean_fraction = 0.10
    c.ambient.annotation = "fixed"
    c.train.total_images = 19_200
    c.train.checkpoint_every_steps = 100
    c.train.sample_every_steps = 0
    c.optim.warmup_images = 6_400
    c.ema.halflife_images = 20_000
    c.sampler.num_steps = 10
    c.eval.num_samples = 500
    c.ambient.classifier.steps = 1_000
    if variant == "blur":
        c.corrupt.type, c.corrupt.sigma_px = "gaussian_blur", 1.0
        c.ambient.fixed_sigma_min = 1.7
    elif variant == "jpeg":
        c.corrupt.type, c.corrupt.quality = "jpeg", 15
        c.ambient.fixed_sigma_min = 0.5
    elif variant == "motion":
        c.corrupt.type, c.corrupt.length, c.corrupt.angle_deg = "motion_blur", 5, 0.0
        c.ambient.fixed_sigma_min = 0.5
    elif variant == "noise":
        c.corrupt.type, c.corrupt.sigma = "gaussian_noise", 0.2
        c.ambient.fixed_sigma_min = 0.0  # raised to σ_n = σ_ζ by ambient.known_noise
    elif variant == "smoke":
        c.corrupt.type, c.corrupt.sigma_px = "gaussian_blur", 1.0
        c.ambient.fixed_sigma_min = 0.5
        c.data.subset = 200  # 20 clean + 180 blurred
        c.model.base_channels, c.model.channel_mult = 8, (1, 2)
        c.model.attn_resolutions, c.model.channels_per_head = (14,), 8
        c.train.batch_size, c.train.total_images = 32, 128
        c.train.num_samples = 8
        c.sampler.num_steps = 4
        c.ambient.classifier.base_channels, c.ambient.classifier.channel_mult = 8, (1, 2)
        c.ambient.classifier.steps, c.ambient.classifier.batch_size = 40, 32
        c.ambient.classifier.log_every_steps = 20
        c.ambient.annotate.num_sigmas, c.ambient.annotate.num_draws = 8, 2
        c.ambient.annotate.batch_size = 64
        c.eval.num_samples = 32
        c.eval.batch_size = 32
        c.eval.swd_projections = 64
        c.eval.classifier.steps, c.eval.classifier.width = 50, 8
        c.eval.classifier.batch_size, c.eval.classifier.lr = 32, 1e-2
    else:
        raise ValueError(f"unknown ambient_mnist variant {variant!r}: 'blur', 'jpeg', "
                         "'motion', 'noise', 'smoke'")
    return c
