"""Online SFBD on the embedded MNIST-5k digits, the CPU demo beside configs/demo.py.

The same data (50 clean images, 4,950 corrupted once with σ_ζ = 0.2), network, pretraining and
compute as the round-based demo: 6,400 pretraining images, then 12,800 training images (200
steps of 64) with a refresh of 990 noisy images every 20 steps (10 refreshes: every noisy image
denoised twice, 69,300 network evaluations — the demo's two backward passes). The buffer weight
ramps from 0 to 1 over the first 100 online steps.
    python -m sfbd_jax.main --config configs/online_demo.py --workdir /tmp/online_demo
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.mode = "online_sfbd"
    c.online.train_images = 12_800
    c.online.refresh_every_steps = 20
    c.online.refresh_count = 990
    c.online.ramp_start = 0
    c.online.ramp_end = 100
    c.sfbd.denoise_batch_size = 330  # three batches per refresh
    return c
