"""Ambient-Omni locality at CIFAR-10 scale, for GPU/TPU (docs/METHODS.md §3.3): the paper's
example of out-of-distribution images helping at low noise — cats for a dog model.

Target: CIFAR-10's dogs (class 5; ``data.classes``, the evaluation's reference follows), of
which ``corrupt.clean_count`` are kept; pool: the cats (class 3), used below each image's σ_max
from the crop classifier at the receptive field of a denoiser trained on the clean dogs
(annotation 'crops'). Variants (``--config configs/ambient_ood_cifar10.py:VARIANT``):
  'crops'   (default) the crop classifier's σ_max, never at high noise
  'both'    σ_max from the crops and σ_min from the noise-conditional classifier
  'naive'   the cats at every σ;  'clean_only'  the clean dogs alone
EDM's DDPM++ network and schedule. Needs CIFAR-10 prepared for tfds (`tfds build cifar10
--data_dir DIR`, then --config.data.data_dir=DIR).
"""

from configs import default, networks, paper


def get_config(variant: str = "crops"):
    c = default.get_config()
    c.mode = "ambient"
    paper.apply_paper_schedule(c)
    c.data.source, c.data.tfds_name, c.data.split = "tfds", "cifar10", "train"
    c.data.image_size, c.data.channels, c.data.random_flip = 32, 3, True
    c.data.classes = (5,)
    c.model = networks.ddpmpp_cifar10()
    c.optim.lr = 1e-3
    c.train.batch_size = 512
    c.train.total_images = 100_000_000
    c.corrupt.clean_count, c.corrupt.clean_fraction = 1_000, 0.0
    c.corrupt.type, c.corrupt.ood_classes = "ood", (3,)
    c.ambient.locality.denoiser_images = 20_000_000
    c.ambient.locality.num_images = 256
    c.ambient.locality.num_crops = 16
    k = c.ambient.crop_classifier
    k.base_channels, k.channel_mult, k.num_blocks = 64, (2, 2, 2), 2
    k.batch_size, k.steps, k.log_every_steps = 256, 20_000, 500
    c.ambient.classifier.base_channels = 64
    c.ambient.classifier.channel_mult = (2, 2, 2)
    c.ambient.classifier.num_blocks = 2
    c.ambient.classifier.batch_size = 256
    c.ambient.classifier.steps = 20_000
    c.ambient.annotate.num_sigmas = 32
    c.ambient.annotate.num_draws = 8
    c.ambient.annotate.batch_size = 256
    if variant == "crops":
        c.ambient.annotation, c.ambient.locality.high_noise = "crops", "never"
    elif variant == "both":
        c.ambient.annotation, c.ambient.locality.high_noise = "crops", "classifier"
    elif variant == "naive":
        c.ambient.annotation = "every_sigma"
    elif variant == "clean_only":
        c.ambient.annotation = "exclude"
    else:
        raise ValueError(f"unknown ambient_ood_cifar10 variant {variant!r}: 'crops', 'both', "
                         "'naive', 'clean_only'")
    return c
