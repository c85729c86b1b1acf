"""SFBD on CIFAR-10 with EDM's DDPM++ network (METHODS.md §1–2), for GPU/TPU.

Variants (``--config configs/cifar10_sfbd.py:VARIANT``):
  ''        50 clean images, σ_ζ = 0.2 (the seed's headline table: FID 13.53)
  'frac4'   4% clean, σ_ζ = 0.59 (later paper version: FID 6.31)
  'frac10'  10% clean, σ_ζ = 0.59 (FID 3.58)
Needs CIFAR-10 prepared for tfds (`tfds build cifar10 --data_dir DIR`, then
--config.data.data_dir=DIR).
"""

from configs import default, networks, paper


def get_config(variant: str = ""):
    c = default.get_config()
    c.mode = "sfbd"
    paper.apply_paper_schedule(c)
    c.data.source, c.data.tfds_name, c.data.split = "tfds", "cifar10", "train"
    c.data.image_size, c.data.channels, c.data.random_flip = 32, 3, True
    c.model = networks.ddpmpp_cifar10()
    c.optim.lr = 1e-3
    c.train.batch_size = 512
    c.sampler.num_steps = 18
    if variant == "":
        c.corrupt.clean_count, c.corrupt.sigma = 50, 0.2
    elif variant in ("frac4", "frac10"):
        c.corrupt.clean_count = 0
        c.corrupt.clean_fraction = 0.04 if variant == "frac4" else 0.10
        c.corrupt.sigma = 0.59
    else:
        raise ValueError(f"unknown cifar10_sfbd variant {variant!r}: '', 'frac4', 'frac10'")
    c.sfbd.denoise_batch_size = 1024
    return c
