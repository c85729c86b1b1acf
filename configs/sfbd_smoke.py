"""SFBD at smoke size: 64 MNIST-5k digits at 16×16, a tiny network, 2 short rounds.

Seconds on a CPU. Used by the multi-host test (2 processes must match 1 process), the Colab
notebook's test run, and as a quick check that an installation works end to end:
    python -m sfbd_jax.main --config configs/sfbd_smoke.py --workdir /tmp/sfbd_smoke
It learns nothing useful; configs/demo.py is the smallest run that does.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.mode = "sfbd"
    c.data.subset = 64
    c.data.image_size = 16
    c.corrupt.clean_count = 16
    c.corrupt.sigma = 0.2
    c.corrupt.shard_size = 32
    c.model.base_channels = 8
    c.model.channel_mult = (1, 2)
    c.model.attn_resolutions = (8,)
    c.model.channels_per_head = 8
    c.model.emb_mult = 2
    c.sampler.num_steps = 4
    c.sfbd.pretrain_images = 64
    c.sfbd.rounds = 2
    c.sfbd.images_per_round = 32
    c.sfbd.backward_num_steps = 10
    c.sfbd.denoise_batch_size = 16
    c.sfbd.denoise_shard_size = 32
    c.optim.warmup_images = 64
    c.ema.halflife_images = 64
    c.train.batch_size = 16
    c.train.log_every_steps = 2
    c.train.checkpoint_every_steps = 2
    c.train.num_samples = 16
    c.train.async_checkpoints = False
    return c
