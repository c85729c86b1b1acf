"""The CPU-scale reproduction of the SFBD table on MNIST-5k (benchmarks/reproduce_mnist.py).

50 clean digits, the other 4,950 corrupted once with σ_ζ (variant ``sigma0.2`` or
``sigma0.59``). Every row of the table trains the same 1.26 M-parameter U-Net on the same
number of images: pretrain_images + rounds × images_per_round (EMDiffusion: ``emdiffusion``).
Metrics: classifier-feature
Fréchet distance and sliced Wasserstein distance of 500 samples (10-level Heun grid) against
the 5,000 clean originals, memorisation (nearest training images), precision/recall and
density/coverage in the classifier's features, and the PSNR of each D^(k) against the
originals.
Variant ``smoke``: a tiny network and budgets, for the test suite.
"""

from configs import default


def get_config(variant: str = "sigma0.2"):
    c = default.get_config()
    c.mode = "sfbd"
    c.corrupt.clean_count = 50
    c.sfbd.pretrain_images = 3_200
    c.sfbd.rounds = 4
    c.sfbd.images_per_round = 2_560
    c.sfbd.backward_num_steps = 10
    c.sfbd.eval_every_round = True
    c.sampler.num_steps = 10  # 19 evaluations per sample (metrics and sample grids)
    c.optim.warmup_images = 3_200
    c.ema.halflife_images = 10_000
    c.train.checkpoint_every_steps = 100
    c.train.sample_every_steps = 0
    c.eval.metrics = "classifier_fd,swd,noise,memorisation,precision_recall,density_coverage"
    c.eval.num_samples = 500
    c.eval.round_num_samples = 500
    if variant == "sigma0.2":
        c.corrupt.sigma = 0.2
    elif variant == "sigma0.59":
        c.corrupt.sigma = 0.59
        c.sfbd.backward_num_steps = 12  # 5 levels below σ_ζ = 0.59: 9 evaluations per image
    elif variant == "smoke":
        c.corrupt.sigma = 0.2
        c.data.subset = 400  # 50 clean + 350 noisy
        c.corrupt.clean_count = 50
        c.model.base_channels, c.model.channel_mult = 8, (1, 2)
        c.model.attn_resolutions, c.model.channels_per_head = (14,), 8
        c.train.batch_size = 32
        c.sfbd.pretrain_images = c.sfbd.images_per_round = 64
        c.sfbd.rounds = 2
        c.sfbd.backward_num_steps = 10  # 7 evaluations per image, as at σ_ζ = 0.2 (sfbd_quick)
        c.sfbd.denoise_shard_size = 512
        c.sfbd.denoise_batch_size = 512
        c.sampler.num_steps = 4
        c.train.num_samples = 8
        c.eval.num_samples = c.eval.round_num_samples = 32
        c.eval.batch_size = 32
        c.eval.swd_projections = 64
        c.eval.classifier.steps, c.eval.classifier.width = 50, 8
        c.eval.classifier.batch_size, c.eval.classifier.lr = 32, 1e-2
    else:
        raise ValueError(f"unknown reproduce_mnist variant {variant!r}: 'sigma0.2', "
                         "'sigma0.59', 'smoke'")
    # EMDiffusion's E-step (row 'emdiffusion', see ``emdiffusion``): the DPS setting with the
    # best PSNR on 64 noisy images of seed 0 with its pretrained model at the row's levels
    # (benchmarks/dps_calibration.py, RESULTS.md: tuned on the originals, in the baseline's
    # favour). σ_ζ = 0.2, 9 levels: the normalised step of the DPS paper and the EMDiffusion
    # code with ζ = 4 (of 1, 2, 4, 8; the likelihood step diverges there). σ_ζ = 0.59,
    # 12 levels: the likelihood step (Bayes' rule under DPS's Gaussian likelihood, ζ = 1),
    # 17.9 dB against 15.2 dB for the best normalised step (ζ = 4 of 1, 2, 4, 8, 16).
    if variant == "sigma0.59":
        c.sfbd.dps_guidance, c.sfbd.dps_zeta = "likelihood", 1.0
    else:
        c.sfbd.dps_guidance, c.sfbd.dps_zeta = "normalized", 4.0
    return c


EM_ROUNDS = 1  # EMDiffusion's E/M rounds at SFBD's compute (its E-step is ~3× dearer per level)


def emdiffusion(c):
    """Make ``c`` (an SFBD config of this file) the row 'emdiffusion': EMDiffusion at SFBD's
    compute. The same pretraining and training images; ``EM_ROUNDS`` rounds whose E-step draws
    a DPS posterior sample of every noisy image with L levels, L the largest number for which
    the E-steps cost no more per noisy image than SFBD's backward passes in forward-pass
    equivalents (a DPS level: one evaluation + its gradient ≈ 3; SFBD: rounds × its ODE
    evaluations)."""
    from sfbd_jax.methods import backward

    ode_evaluations, _ = backward.cost_per_image(c, c.corrupt.sigma)
    budget = c.sfbd.rounds * ode_evaluations
    images = c.sfbd.rounds * c.sfbd.images_per_round
    c.sfbd.backward = "dps"
    c.sfbd.rounds = EM_ROUNDS
    c.sfbd.images_per_round = images // EM_ROUNDS
    c.sfbd.dps_num_steps = budget // (3 * EM_ROUNDS)
    if c.sfbd.dps_num_steps < 2:
        raise ValueError(f"SFBD's backward budget ({budget} evaluations per image) cannot pay "
                         f"for {EM_ROUNDS} DPS E-steps of at least 2 levels")
    return c


def reallocate(c, rounds: int, backward_num_steps: int):
    """Make ``c`` (an SFBD config of this file) SFBD at the same compute with ``rounds``
    rounds whose backward passes run on the Karras grid of ``backward_num_steps`` levels: the
    denoiser evaluations this saves against ``c``'s backward passes (one forward-pass
    equivalent each) are spent on training images (3 each), split evenly over the rounds and
    cut to whole batches. The same pretraining. Raises ValueError where the new passes would
    cost more than ``c``'s."""
    from sfbd_jax.config_checks import noisy_count
    from sfbd_jax.methods import backward

    evaluations, _ = backward.cost_per_image(c, c.corrupt.sigma)
    before = c.sfbd.rounds * noisy_count(c) * evaluations
    c.sfbd.backward_num_steps = backward_num_steps
    evaluations, _ = backward.cost_per_image(c, c.corrupt.sigma)
    after = rounds * noisy_count(c) * evaluations
    if after > before:
        raise ValueError(f"{rounds} backward passes of {evaluations} evaluations per noisy image "
                         f"cost more than SFBD's {c.sfbd.rounds} ({after} > {before} evaluations)")
    images = c.sfbd.rounds * c.sfbd.images_per_round + (before - after) // 3
    per_round = images // rounds
    c.sfbd.rounds = rounds
    c.sfbd.images_per_round = per_round - per_round % c.train.batch_size
    return c


def sfbd_lean(c):
    """Make ``c`` (an SFBD config of this file) the row 'sfbd_lean': SFBD at the same compute
    with half the rounds (rounds // 2, at least one), the backward passes it skips spent on
    training images (``reallocate``). The same pretraining and backward grid."""
    return reallocate(c, max(1, c.sfbd.rounds // 2), c.sfbd.backward_num_steps)


QUICK_BACKWARD_STEPS = 6  # rows 'sfbd_quick', 'sfbd_fewer_quick': [σ_ζ, 0.085, 0.002, 0]


def quick_backward_steps(c) -> int:
    """``QUICK_BACKWARD_STEPS``, after checking that its grid (5 evaluations per noisy image)
    is cheaper than ``c``'s backward grid (7 at σ_ζ = 0.2, 9 at 0.59); ValueError if not."""
    from sfbd_jax.methods import backward

    steps = c.sfbd.backward_num_steps
    evaluations, _ = backward.cost_per_image(c, c.corrupt.sigma)
    c.sfbd.backward_num_steps = QUICK_BACKWARD_STEPS
    quick, _ = backward.cost_per_image(c, c.corrupt.sigma)
    c.sfbd.backward_num_steps = steps
    if quick >= evaluations:
        raise ValueError(f"the grid of {QUICK_BACKWARD_STEPS} levels costs {quick} "
                         f"evaluations per image, not fewer than SFBD's {evaluations} "
                         f"(sfbd.backward_num_steps={steps})")
    return QUICK_BACKWARD_STEPS


def sfbd_quick(c):
    """Make ``c`` (an SFBD config of this file) the row 'sfbd_quick': SFBD at the same compute
    and rounds with cheaper backward passes, on the Karras grid of ``QUICK_BACKWARD_STEPS``
    levels, the evaluations saved spent on training images (``reallocate``)."""
    return reallocate(c, c.sfbd.rounds, quick_backward_steps(c))


def sfbd_fewer_quick(c):
    """Make ``c`` (an SFBD config of this file) the row 'sfbd_fewer_quick': SFBD at the same
    compute with three quarters of the rounds (3 of 4; at least one) *and* the cheaper backward
    grid of 'sfbd_quick', the evaluations saved spent on training images (``reallocate``):
    about the training of 'sfbd_lean' and one denoising pass more."""
    return reallocate(c, max(1, c.sfbd.rounds * 3 // 4), quick_backward_steps(c))
