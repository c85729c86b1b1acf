"""Class-conditional EDM on the embedded MNIST-5k digits: clean labels, flipped labels and CEP
(METHODS.md §4), tiny CPU network (benchmarks/cep_mnist.py).

Every image is clean (corrupt.clean_fraction = 1; mode=edm trains on the prepared clean group,
data.use_prepared), labels from the data set. Variants (``--config configs/cep_mnist.py:V``):
  'clean'                             the labels as they are
  'flip2.5', 'flip5', 'flip10', 'flip20'   η % of the labels flipped (corrupt.label_flip)
  'cep_u', 'cep_g'                    clean labels, CEP-U / CEP-G with γ = 1
  'smoke'                             a tiny network and budget (the test suite)
Label dropout 0.1 in every variant, so guided sampling (sampler.guidance) is available.
"""

from configs import default

FLIPS = {"flip2.5": 0.025, "flip5": 0.05, "flip10": 0.10, "flip20": 0.20}


def get_config(variant: str = "clean"):
    c = default.get_config()
    c.mode = "edm"
    c.data.use_prepared = True
    c.corrupt.clean_count, c.corrupt.clean_fraction = 0, 1.0
    c.model.num_classes = 10
    c.model.label_dropout = 0.1
    c.train.total_images = 19_200
    c.train.checkpoint_every_steps = 100
    c.train.sample_every_steps = 0
    c.train.num_samples = 100  # 10 per class
    c.optim.warmup_images = 6_400
    c.ema.halflife_images = 20_000
    c.sampler.num_steps = 10
    c.eval.num_samples = 1_000  # 100 per class for the per-class Fréchet distances
    if variant in FLIPS:
        c.corrupt.label_flip = FLIPS[variant]
    elif variant == "cep_u":
        c.cep.kind = "uniform"
    elif variant == "cep_g":
        c.cep.kind = "gaussian"
    elif variant == "smoke":
        c.data.subset = 200
        c.corrupt.label_flip = 0.1
        c.cep.kind = "gaussian"
        c.model.base_channels, c.model.channel_mult = 8, (1, 2)
        c.model.attn_resolutions, c.model.channels_per_head = (14,), 8
        c.train.batch_size, c.train.total_images = 32, 128
        c.train.num_samples = 10
        c.sampler.num_steps = 4
        c.eval.num_samples, c.eval.batch_size = 40, 40
        c.eval.swd_projections = 64
        c.eval.classifier.steps, c.eval.classifier.width = 50, 8
        c.eval.classifier.batch_size, c.eval.classifier.lr = 32, 1e-2
    elif variant != "clean":
        raise ValueError(f"unknown cep_mnist variant {variant!r}: 'clean', "
                         f"{', '.join(repr(v) for v in FLIPS)}, 'cep_u', 'cep_g', 'smoke'")
    return c
