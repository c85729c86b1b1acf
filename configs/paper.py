"""Settings the GPU/TPU paper configs share (EDM's schedule, SFBD's phase lengths)."""

import ml_collections


def apply_paper_schedule(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """EDM warm-up (10 M images) and EMA half-life (0.5 M images), logging/checkpoint cadence,
    and the SFBD phases (10 M images of pretraining, 5 rounds of 20 M, the reference code's
    40-level backward grid), FID-based metrics. The phase lengths are this project's
    choice."""
    c.optim.warmup_images = 10_000_000
    c.ema.halflife_images = 500_000
    c.train.log_every_steps = 500
    c.train.checkpoint_every_steps = 5_000
    c.train.sample_every_steps = 20_000
    c.train.num_samples = 64
    c.corrupt.shard_size = 10_000
    c.sfbd.pretrain_images = 10_000_000
    c.sfbd.rounds = 5
    c.sfbd.images_per_round = 20_000_000
    c.sfbd.backward_num_steps = 40
    c.sfbd.denoise_shard_size = 10_240
    # The papers' FID (needs --config.eval.inception_weights, see README) and, in the same
    # Inception features, memorisation and the quality/diversity split.
    c.eval.metrics = "fid,noise,memorisation,precision_recall,density_coverage"
    return c
