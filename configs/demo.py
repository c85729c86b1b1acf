"""The README's main job: SFBD on the embedded MNIST-5k digits, tiny CPU network.

50 clean images; the other 4,950 corrupted once with σ_ζ = 0.2 (--config.corrupt.sigma=...).
Pretrain on the 50, then 2 rounds of denoising every noisy image and fine-tuning on the
denoised ∪ clean set. Per-round PSNR of the denoised set and sample grids show the progress.
Measured with these settings on the 2-core CPU (2026-11-23): 11 min 53 s; PSNR of the noisy
set 22.6 dB → D^(1) 28.1 dB → D^(2) 28.7 dB (benchmarks/RESULTS.md).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.mode = "sfbd"
    c.corrupt.clean_count = 50
    c.corrupt.sigma = 0.2
    c.sfbd.pretrain_images = 6_400
    c.sfbd.rounds = 2
    c.sfbd.images_per_round = 6_400
    c.sfbd.backward_num_steps = 10  # 4 levels from σ_ζ = 0.2: 7 evaluations per image
    c.train.sample_every_steps = 0
    c.train.checkpoint_every_steps = 100
    c.optim.warmup_images = 6_400
    c.ema.halflife_images = 20_000
    # Demo-sized evaluation (python -m sfbd_jax.evaluate --config configs/demo.py --workdir
    # runs/demo): 1,000 samples, minutes on 2 CPU cores (the default is the papers' 50,000).
    c.eval.num_samples = 1_000
    return c
