"""SFBD where p_data is known exactly: a Gaussian mixture (benchmarks/gmm_convergence.py).

Variants: '2d' (8 components on a circle, for scatter plots) and '16d' (6 components with
random means). 50 clean samples and 5,000 samples corrupted once with σ_ζ; a small MLP
denoiser with EDM preconditioning. The distance of the model to p_data is measured after
every round with fresh samples of both.
"""

import ml_collections


def get_config(variant: str = "2d"):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.gmm = ml_collections.ConfigDict()
    c.gmm.dim = 2
    c.gmm.components = 8
    c.gmm.layout = "circle"  # 'circle' (2-D) or 'random' (means ~ N(0, mean_scale²/dim))
    c.gmm.radius = 0.7  # circle radius / random means' expected norm, on the [-1, 1] scale
    c.gmm.std = 0.07  # per-coordinate std of each component
    c.clean_count = 50
    c.noisy_count = 5_000
    c.sigma_zeta = 0.2
    c.rounds = 6
    c.model = ml_collections.ConfigDict()
    c.model.width = 256
    c.model.depth = 4
    c.model.emb_dim = 64
    c.diffusion = ml_collections.ConfigDict(dict(sigma_data=0.5, p_mean=-1.2, p_std=1.2))
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256
    c.train.lr = 3e-4  # 1e-3 blurs the components more with every round (measured)
    c.train.pretrain_steps = 3_000
    c.train.round_steps = 2_000
    c.sampler = ml_collections.ConfigDict(dict(num_steps=32, sigma_min=0.002, sigma_max=80.0,
                                                rho=7.0))
    c.backward_num_steps = 32  # Karras grid size before truncation below σ_ζ
    c.eval_samples = 5_000
    # Online SFBD beside it, from the same pretrained model, with these refresh rules
    # ('fixed', 'adaptive': config.online.refresh_rule of sfbd_jax).
    c.online_refresh_rules = ("fixed",)
    c.swd_projections = 256
    if variant == "16d":
        c.gmm.dim, c.gmm.components, c.gmm.layout, c.gmm.std = 16, 6, "random", 0.1
        c.gmm.radius = 0.8
    elif variant == "smoke":
        c.rounds, c.noisy_count, c.eval_samples = 1, 500, 500
        c.train.pretrain_steps = c.train.round_steps = 50
        c.model.width, c.model.depth = 32, 2
        c.sampler.num_steps = c.backward_num_steps = 8
    elif variant != "2d":
        raise ValueError(f"unknown gmm_convergence variant {variant!r}: '2d', '16d', 'smoke'")
    return c
