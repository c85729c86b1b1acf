"""Ambient Diffusion Omni on CIFAR-10 with EDM's DDPM++ network (METHODS.md §3), for GPU/TPU.

10% of the training images stay clean (a seeded split); the other 90% are corrupted once.
Variants (``--config configs/ambient_cifar10.py:VARIANT``):
  'blur0.4', 'blur0.6', 'blur0.8', 'blur1.0'   Gaussian blur σ_B in pixels (the paper's sweep)
  'jpeg'                                        JPEG quality 15 (also: --config.corrupt.quality)
σ_min comes from the noise-conditional classifier (ambient.annotation='classifier'; it is
trained once per data set and cached in WORKDIR/annotator/). For
--config.ambient.annotation=fixed set --config.ambient.fixed_sigma_min to the median σ_min the
classifier logged: no fixed value for CIFAR-10 has been measured here (it cannot be
downloaded on the project's machines), so the one below is only a placeholder.
Training length: EDM's 200 M images. Needs CIFAR-10 prepared for tfds (`tfds build cifar10
--data_dir DIR`, then --config.data.data_dir=DIR).
"""

from configs import default, networks, paper


def get_config(variant: str = "blur0.6"):
    c = default.get_config()
    c.mode = "ambient"
    paper.apply_paper_schedule(c)
    c.data.source, c.data.tfds_name, c.data.split = "tfds", "cifar10", "train"
    c.data.image_size, c.data.channels, c.data.random_flip = 32, 3, True
    c.model = networks.ddpmpp_cifar10()
    c.optim.lr = 1e-3
    c.train.batch_size = 512
    c.train.total_images = 200_000_000
    c.corrupt.clean_count, c.corrupt.clean_fraction = 0, 0.10
    c.ambient.annotation = "classifier"
    c.ambient.fixed_sigma_min = 0.5  # placeholder (see above)
    c.ambient.classifier.base_channels = 64
    c.ambient.classifier.channel_mult = (2, 2, 2)
    c.ambient.classifier.num_blocks = 2
    c.ambient.classifier.batch_size = 256
    c.ambient.classifier.steps = 20_000
    c.ambient.classifier.log_every_steps = 500
    c.ambient.annotate.num_sigmas = 32
    c.ambient.annotate.num_draws = 8
    c.ambient.annotate.batch_size = 256
    if variant.startswith("blur") and variant[4:] in ("0.4", "0.6", "0.8", "1.0"):
        c.corrupt.type, c.corrupt.sigma_px = "gaussian_blur", float(variant[4:])
    elif variant == "jpeg":
        c.corrupt.type, c.corrupt.quality = "jpeg", 15
    else:
        raise ValueError(f"unknown ambient_cifar10 variant {variant!r}: 'blur0.4', 'blur0.6', "
                         "'blur0.8', 'blur1.0', 'jpeg'")
    return c
