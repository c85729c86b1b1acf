"""SFBD on CelebA 64×64 with the NCSN++ network (METHODS.md §1–2), for GPU/TPU.

Variants (``--config configs/celeba64_sfbd.py:VARIANT``):
  ''          50 clean images, σ_ζ = 0.2 (the seed's headline table: FID 6.49)
  'sigma1.38' 50 clean images, σ_ζ ≈ 1.38 (the later paper version's large-noise setting)
Images: centre crop 140×140, resized to 64×64. Needs celeb_a prepared for tfds
(`tfds build celeb_a --data_dir DIR`, then --config.data.data_dir=DIR).
"""

from configs import default, networks, paper


def get_config(variant: str = ""):
    c = default.get_config()
    c.mode = "sfbd"
    paper.apply_paper_schedule(c)
    c.data.source, c.data.tfds_name, c.data.split = "tfds", "celeb_a", "train"
    c.data.image_size, c.data.center_crop, c.data.channels = 64, 140, 3
    c.data.random_flip = True
    c.model = networks.ncsnpp_celeba64()
    c.optim.lr = 2e-4
    c.train.batch_size = 256
    c.sampler.num_steps = 40
    c.corrupt.dtype = "float16"  # 162k × 64×64×3 noisy values: 4 GB instead of 8
    c.corrupt.clean_count = 50
    if variant == "":
        c.corrupt.sigma = 0.2
    elif variant == "sigma1.38":
        c.corrupt.sigma = 1.38
    else:
        raise ValueError(f"unknown celeba64_sfbd variant {variant!r}: '', 'sigma1.38'")
    c.sfbd.denoise_batch_size = 512
    return c
