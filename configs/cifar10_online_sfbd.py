"""Online SFBD on CIFAR-10 with EDM's DDPM++ network, for GPU/TPU: the SFBD-flow paper's
setting (4% clean, σ_ζ = 0.59, a refresh every m = 20 steps).

Choices the paper does not fix, made here: 512 images per refresh (one denoising batch; the
48,000 noisy images are covered every 94 refreshes = 1,880 steps ≈ 0.96 M training images),
the buffer weight ramped over the first 2,000 online steps, pretraining and total length from
configs/paper.py's SFBD schedule (pretraining as mode 'sfbd' round 0; online training for the
images round-based SFBD spends on its forward rounds). The refresh writes every denoised image
(rule 'fixed'); the authors' default is adaptive: `--config.online.refresh_rule=adaptive
--config.online.adaptive_features=inception --config.eval.inception_weights=PATH` is this
project's reading of it (docs/METHODS.md).
Needs CIFAR-10 prepared for tfds (`tfds build cifar10 --data_dir DIR`, then
--config.data.data_dir=DIR).
"""

from configs import cifar10_sfbd


def get_config():
    c = cifar10_sfbd.get_config("frac4")
    c.mode = "online_sfbd"
    c.online.train_images = c.sfbd.rounds * c.sfbd.images_per_round
    c.online.refresh_every_steps = 20
    c.online.refresh_count = 512
    c.online.ramp_start = 0
    c.online.ramp_end = 2_000
    c.sfbd.denoise_batch_size = 512
    return c
