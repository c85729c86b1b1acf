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

from configs import ambient_cifar10


def get_config(variant: str = "crops"):
    # ambient_cifar10's data, network, schedule and noise classifier; the pool replaces the
    # blur.
    c = ambient_cifar10.get_config("blur0.6")
    c.data.classes = (5,)
    c.train.total_images = 100_000_000
    c.corrupt.clean_count, c.corrupt.clean_fraction = 1_000, 0.0
    c.corrupt.type, c.corrupt.ood_classes = "ood", (3,)
    c.ambient.locality.denoiser_images = 20_000_000
    c.ambient.locality.num_images = 256
    c.ambient.locality.num_crops = 16
    k = c.ambient.crop_classifier
    for key in ("base_channels", "channel_mult", "num_blocks", "batch_size", "steps",
                "log_every_steps"):
        k[key] = c.ambient.classifier[key]
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
