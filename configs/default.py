"""Base config: every key the code reads, with a tiny network on the embedded MNIST-5k data.

Other configs import this one and change a few fields. Units: σ on the [-1, 1] image scale;
sizes in images (as EDM counts training length, warm-up and EMA half-life).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # 'edm': plain EDM training on the clean data set; 'sfbd', 'online_sfbd', 'ambient': the
    # methods (their sections below).
    c.mode = "edm"
    c.seed = 0  # model init, per-step randomness, batch order, sample grids.
    c.num_cpu_devices = 0  # host devices exposed on the CPU platform; 0 = one per core.

    c.data = ml_collections.ConfigDict()
    c.data.source = "mnist5k"  # 'mnist5k' (embedded), 'tfds' or 'folder'.
    c.data.tfds_name = ""  # source 'tfds': e.g. 'cifar10', 'celeb_a', 'mnist'.
    c.data.split = "train"  # source 'tfds': any tfds split expression.
    c.data.data_dir = ""  # source 'tfds': the prepared tfds data dir ('' = tfds default).
    c.data.folder = ""  # source 'folder': a directory of image files.
    # source 'folder': files that cannot be read (or cropped) stop the run, all listed at once
    # ('refuse'), or are listed in the log and left out ('skip').
    c.data.unreadable_files = "refuse"
    c.data.image_size = 28  # images are centre-cropped (below) then resized to this.
    c.data.center_crop = 0  # crop to this square first; 0 = none (CelebA-64: 140).
    c.data.channels = 1
    c.data.subset = 0  # mnist5k/folder: a seeded random subset of this many images; 0 = all.
    c.data.subset_seed = 0
    # Keep only the images of these class labels (e.g. (0, 1, 2, 3, 4): the target classes of
    # an out-of-distribution experiment; the evaluation's reference follows); () = all.
    c.data.classes = ()
    c.data.random_flip = False  # horizontal flips at batch time (seeded per step).
    # mode=edm: train on the clean group of the prepared data set of config.corrupt instead
    # (e.g. corrupt.clean_fraction=1 with corrupt.label_flip=η: clean images, noisy labels).
    c.data.use_prepared = False
    # With use_prepared: 'clean' (the clean group) or 'noisy' (the corrupted images clipped to
    # [-1, 1], then the clean group: EDM trained on the corrupted data set as given).
    c.data.prepared_group = "clean"

    # The once-corrupted data set (python -m sfbd_jax.data.prepare --config ...).
    c.corrupt = ml_collections.ConfigDict()
    c.corrupt.output_dir = ""  # where the shards and manifest.json are written.
    c.corrupt.split_seed = 0  # which images stay clean.
    c.corrupt.noise_seed = 1  # the one-time corruption noise.
    c.corrupt.clean_count = 50  # clean images kept (SFBD headline: 50); 0 = use the fraction.
    c.corrupt.clean_fraction = 0.0  # e.g. 0.04 or 0.10 when clean_count is 0.
    # gaussian_noise | gaussian_blur | jpeg | motion_blur | folder (low-quality images from
    # corrupt.folder instead of corrupting the non-clean part of the source, which is unused)
    # | ood (an out-of-distribution pool, below) | mixed (several of these, below).
    c.corrupt.type = "gaussian_noise"
    c.corrupt.sigma = 0.2  # gaussian_noise: σ_ζ on the [-1, 1] scale.
    c.corrupt.sigma_px = 0.6  # gaussian_blur: σ_B in pixels.
    c.corrupt.quality = 30  # jpeg quality.
    c.corrupt.length = 5  # motion_blur: kernel length in pixels.
    c.corrupt.angle_deg = 0.0  # motion_blur: direction.
    c.corrupt.folder = ""  # folder: a directory of low-quality images (resized as config.data).
    # ood: the low-quality group is an out-of-distribution pool, as it is: the images of
    # ood_classes of config.data's source (data.classes set aside), or with ood_tfds_name the
    # ood_split of another tfds data set (resized as config.data; same channels).
    c.corrupt.ood_classes = ()
    c.corrupt.ood_tfds_name = ""
    c.corrupt.ood_split = "train"
    # mixed: every non-clean image gets one component of this mixture (drawn ∝ weight, its
    # index stored per image as noisy/types-*), 'ood' adds the pool above; e.g.
    # "gaussian_blur:sigma_px=0.8; jpeg:quality=20; motion_blur:length=5,angle_deg=30; ood".
    c.corrupt.mixture = ""
    # Condition corruption: flip this fraction η of the labels (clean and corrupted images
    # alike) to another class drawn from the class prior; 0 = none.
    c.corrupt.label_flip = 0.0
    c.corrupt.label_flip_seed = 0
    c.corrupt.dtype = "float16"  # noisy values stored as float16 (rounding recorded) or float32.
    c.corrupt.shard_size = 10_000  # images per shard.

    # SFBD (config.mode = 'sfbd'); the noisy data come from config.corrupt.
    c.sfbd = ml_collections.ConfigDict()
    c.sfbd.pretrain_images = 6_400  # EDM training on the clean subset (round 0).
    c.sfbd.rounds = 2  # K backward/forward rounds; 0 = pretrain only.
    c.sfbd.images_per_round = 6_400  # forward fine-tuning per round.
    c.sfbd.backward_num_steps = 18  # Karras grid size before truncation below σ_ζ.
    c.sfbd.backward_churn = 0.0  # > 0: stochastic backward step.
    # How the backward step reconstructs each noisy image y: 'ode' (SFBD: the probability-flow
    # ODE from σ_ζ starting at y) or 'dps' (EMDiffusion's E-step, Bai et al. 2024: diffusion
    # posterior sampling from σ_max, every ancestral step guided towards y through the
    # denoiser's gradient).
    c.sfbd.backward = "ode"
    c.sfbd.dps_num_steps = 100  # Karras grid levels from σ_max; each: 1 evaluation + gradient.
    # 'normalized': x −= ζ·∇‖y − D(x; σ)‖ (the DPS paper, the EMDiffusion code; ζ per step);
    # 'likelihood': x −= ζ·(σ_i² − σ_{i+1}²)·∇‖y − D‖²/(2v), v = σ_ζ² (ζ = 1: Bayes' rule under
    # DPS's Gaussian likelihood).
    c.sfbd.dps_guidance = "normalized"
    c.sfbd.dps_zeta = 1.0
    # 'likelihood' only: add to v the variance of x₀ given x_σ under a Gaussian prior of std
    # diffusion.sigma_data (exact for Gaussian data).
    c.sfbd.dps_prior_variance = False
    c.sfbd.denoise_batch_size = 256  # global, split over devices.
    c.sfbd.denoise_shard_size = 2_048  # images per D^(k) shard (a multiple of the batch).
    c.sfbd.denoised_dtype = "float16"  # storage of D^(k) and of online SFBD's buffer.
    c.sfbd.clean_repeat = 1  # clean images appear this often in D^(k) ∪ D_clean (1 = uniform).
    c.sfbd.restart_warmup = False  # restart the lr warm-up every round (the reference bug).
    c.sfbd.eval_every_round = True  # sample grids after every round (else only the last).

    # Online SFBD (config.mode = 'online_sfbd'; SFBD flow, Lu, Lo & Yu 2026): pretrain on the
    # clean subset for sfbd.pretrain_images (as mode 'sfbd' round 0), then train without rounds
    # on the clean subset ∪ a denoised buffer (one entry per noisy image) refreshed as the
    # model improves. The refresh is SFBD's backward step (sfbd.backward_num_steps,
    # sfbd.backward_churn, the sampler's grid options) with the current EMA parameters.
    c.online = ml_collections.ConfigDict()
    c.online.train_images = 12_800  # training images after pretraining.
    c.online.refresh_every_steps = 20  # m: a refresh before every m-th online step.
    # Noisy images denoised per refresh, in a seeded order that cycles through the whole set
    # (the same permutation every cycle); a multiple of the device count.
    c.online.refresh_count = 64
    # Which copy of the network denoises: 'ema' (as round-based SFBD) or 'params' (the live
    # weights); the paper does not say.
    c.online.denoise_with = "ema"
    # Weight w of the buffer, linear from 0 at online step ramp_start to 1 at ramp_end (online
    # steps count from the end of pretraining). Each example of a batch is a buffer entry with
    # probability w·n/(N_clean + w·n), n = entries denoised so far (w = 1: uniform over
    # clean ∪ buffer, as round-based SFBD), or w·(1 − clean_share) when clean_share > 0.
    c.online.ramp_start = 0
    c.online.ramp_end = 100
    c.online.clean_share = 0.0  # > 0: a fixed share of clean examples (Online SFBD-OMNI: 0.2).
    # config.eval metrics (with eval.round_num_samples > 0) and a sample grid every this many
    # online steps; 0 = only at the end of pretraining and at the end.
    c.online.eval_every_steps = 0
    # How much of each refresh is written to the buffer. 'fixed': every denoised image (the
    # default here: deterministic). 'adaptive' (the authors' default, our reading of it): the
    # refresh's candidates replace the entries they would overwrite only in proportion to how
    # much closer they are to the clean subset: q = clip((KID_old − KID_new)/KID_old, 0, 1),
    # KID (unbiased polynomial-kernel MMD²) of the replaced entries and of the candidates
    # against the clean subset in adaptive_features; a seeded q-share of the previously
    # denoised rows is committed; rows never denoised are always committed.
    c.online.refresh_rule = "fixed"
    # Features of the adaptive KID: 'pixels' (flattened images) or 'inception' (needs
    # eval.inception_weights). Not the evaluation classifier: it is trained on the
    # evaluation-only originals, which training must not see.
    c.online.adaptive_features = "pixels"

    # Ambient Diffusion Omni (config.mode = 'ambient'): clean ∪ low-quality images from
    # config.corrupt (a corruption of the library, or type 'folder'), each low-quality image
    # used only at σ > σ_min·√(s_max/(s_max−1)) (or σ < σ_max, locality).
    c.ambient = ml_collections.ConfigDict()
    # 'fixed' (fixed_sigma_min for every low-quality image), 'classifier' (noise-conditional
    # classifier below), 'file' (annotation_file), 'every_sigma' (σ_min = 0: naive baseline),
    # 'exclude' (clean images only), 'crops' (σ_max per image from the crop classifier of
    # ambient.locality; σ_min per locality.high_noise), 'per_type' (a mixed set: below).
    c.ambient.annotation = "fixed"
    # 'file': an .npz of sigma_min [, sigma_max, sigma_n], each (N,) in the order of the
    # prepared low-quality group (its source indices: noisy/indices-*.npy).
    c.ambient.annotation_file = ""
    c.ambient.fixed_sigma_min = 0.5
    c.ambient.fixed_sigma_max = 0.0  # locality: also used below this σ; 0 = never.
    # 'per_type' (a mixed set): σ_min / σ_max per component, in corrupt.mixture's order
    # (float('inf') = never at high noise; σ_max () = no low-noise use).
    c.ambient.type_sigma_min = ()
    c.ambient.type_sigma_max = ()
    c.ambient.s_max = 4.0  # safety factor √(s_max/(s_max−1)) above σ_min.
    c.ambient.known_noise = True  # gaussian_noise data: σ_n = corrupt.sigma, ambient loss.
    # The noise-conditional classifier c(x_σ, σ) → P(corrupted) (encoder half of the U-Net);
    # batch_size global, half clean and half low-quality.
    c.ambient.classifier = _binary_classifier()
    # Locality (annotation 'crops'): σ_max of each low-quality / out-of-distribution image
    # from a crop classifier at the denoiser's receptive field per σ (methods/locality.py).
    c.ambient.locality = ml_collections.ConfigDict()
    # The denoiser whose receptive field is measured: a run directory with checkpoints/ of a
    # model with this config's network, or "" to train one on the clean group first.
    c.ambient.locality.denoiser_checkpoint = ""
    c.ambient.locality.denoiser_images = 20_000  # its training images when trained here.
    c.ambient.locality.mass = 0.9  # the crop holds this share of the input-gradient mass.
    c.ambient.locality.num_images = 32  # clean images the gradient is averaged over.
    c.ambient.locality.draws = 2  # noise draws per image and level.
    c.ambient.locality.num_crops = 8  # crops per image and crop size in the annotation.
    # σ_min of the pool images: 'never' (∞: low noise only), 'fixed' (fixed_sigma_min) or
    # 'classifier' (the noise-conditional classifier above): usable at high and low noise.
    c.ambient.locality.high_noise = "never"
    c.ambient.locality.seed = 0
    # The crop classifier: in-distribution vs pool crops, conditioned on the crop size (the
    # same encoder and training settings; batch half in-distribution and half pool).
    c.ambient.crop_classifier = _binary_classifier()

    # σ_min of each low-quality image from P(corrupted) over a log-spaced σ grid.
    c.ambient.annotate = ml_collections.ConfigDict()
    c.ambient.annotate.sigma_lo = 0.01
    c.ambient.annotate.sigma_hi = 5.0
    c.ambient.annotate.num_sigmas = 24
    c.ambient.annotate.num_draws = 4  # noise draws per image and level.
    c.ambient.annotate.smooth_window = 3  # moving average along the grid (odd).
    c.ambient.annotate.epsilon = 0.05  # σ_min: first level where P(corrupted) < 0.5 + ε.
    c.ambient.annotate.batch_size = 128  # images per call (global, split over devices).
    c.ambient.annotate.seed = 0

    # Distribution metrics of generated images (python -m sfbd_jax.evaluate, and SFBD rounds).
    c.eval = ml_collections.ConfigDict()
    # Comma-separated: fid, kid, classifier_fd, swd, noise (residual pixel noise: a wavelet
    # estimate of σ in the samples), memorisation (nearest training images in pixels and
    # features), precision_recall, density_coverage (in the evaluation features:
    # Inception's when eval.inception_weights is set, the feature classifier's otherwise).
    c.eval.metrics = "classifier_fd,swd,noise,memorisation,precision_recall,density_coverage"
    c.eval.num_samples = 50_000  # generated images per evaluation (EDM / SFBD papers: 50k).
    # SFBD: metrics after every round with this many samples; Ambient: at the end; 0 = off.
    c.eval.round_num_samples = 0
    c.eval.batch_size = 256  # global, split over devices (generation and features).
    c.eval.reference_max = 50_000  # clean reference images (all of config.data if fewer).
    c.eval.reference_seed = 0  # reference subsample, KID subsets, SWD directions.
    c.eval.cache_dir = ""  # reference statistics + feature classifier; '' = ~/.cache/sfbd_jax.
    c.eval.inception_weights = ""  # converted FID Inception .npz (fid/kid); see inception.py.
    c.eval.kid_subsets = 100
    c.eval.kid_subset_size = 1000
    c.eval.kid_reference_max = 10_000  # reference features kept for KID.
    c.eval.swd_projections = 512
    # Memorisation: a sample is memorised when d1/d2 < this (d1, d2: distances to its nearest
    # and second-nearest training image; Yoon et al. 2023, Gu et al. 2023: 1/3).
    c.eval.memorisation_threshold = 1 / 3
    # Real images outside the training set (seeded subset) whose nearest-training-image
    # distance is the baseline of the samples' (leave-one-out when there are none).
    c.eval.heldout_max = 10_000
    c.eval.copy_pairs = 8  # the most-copied samples saved beside their nearest training image.
    c.eval.pr_k = 3  # improved precision/recall (Kynkäänniemi et al. 2019).
    c.eval.dc_k = 5  # density/coverage (Naeem et al. 2020).
    # Precision/recall, density/coverage: min(samples, references, this) of each (seeded).
    c.eval.prdc_max = 10_000
    c.eval.block_elements = 4_194_304  # distance-matrix entries held at once (float64: 32 MiB).
    # The feature classifier (classifier_fd), trained once on the clean data and cached.
    c.eval.classifier = ml_collections.ConfigDict()
    # MNIST-5k, 2-core CPU: 70 s to train once, held-out accuracy 0.934.
    c.eval.classifier.width = 16
    c.eval.classifier.feature_dim = 128
    c.eval.classifier.steps = 2_000
    c.eval.classifier.batch_size = 64
    c.eval.classifier.lr = 2e-3
    c.eval.classifier.weight_decay = 1e-4
    c.eval.classifier.max_shift = 2  # random ±pixel shifts (augmentation).
    c.eval.classifier.test_fraction = 0.1  # held out to measure its accuracy.
    c.eval.classifier.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.base_channels = 32
    c.model.channel_mult = (1, 2, 2)
    c.model.num_blocks = 1
    c.model.attn_resolutions = (7,)
    c.model.dropout = 0.0
    # Attention heads: EDM's SongUNet (DDPM++, NCSN++) uses one head per attention layer; 0
    # derives the count as channels // channels_per_head (ADM's rule, 64 channels per head).
    c.model.num_heads = 1
    c.model.channels_per_head = 64
    c.model.embedding_type = "positional"  # 'positional' (DDPM++) or 'fourier' (NCSN++).
    c.model.emb_mult = 4
    c.model.num_classes = 0  # > 0: class-conditional (labels from the data set).
    # Conditional models: train with the label replaced by a null class this often, so that
    # classifier-free guidance (sampler.guidance) can use the unconditional denoiser.
    c.model.label_dropout = 0.0
    # Mixed precision: 'bfloat16' runs convolutions, matmuls and activations in bf16 with
    # float32 parameters, optimiser, loss and preconditioning (skip path c_skip·x); 'float32'
    # runs everything in float32.
    c.model.compute_dtype = "float32"

    # CEP (condition-embedding perturbation), training only: e = embed(y) + δ, δ fresh per
    # example, d = model.base_channels (the label embedding width).
    c.cep = ml_collections.ConfigDict()
    c.cep.kind = "none"  # 'none', 'uniform' (CEP-U: U(−γ/√d, γ/√d)), 'gaussian' (CEP-G).
    c.cep.gamma = 1.0

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.sigma_data = 0.5
    c.diffusion.p_mean = -1.2
    c.diffusion.p_std = 1.2

    c.sampler = ml_collections.ConfigDict()
    c.sampler.num_steps = 18  # N levels → 2N − 1 evaluations.
    c.sampler.sigma_min = 0.002
    c.sampler.sigma_max = 80.0
    c.sampler.rho = 7.0
    c.sampler.s_churn = 0.0
    c.sampler.s_tmin = 0.0
    c.sampler.s_tmax = 1e9
    c.sampler.s_noise = 1.0
    # Classifier-free guidance w: D_∅ + w(D_y − D_∅); 1 = the conditional model as trained,
    # 0 = unconditional. w != 1 needs model.label_dropout > 0.
    c.sampler.guidance = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_images = 20_000
    # EDM2's inverse-square-root decay: lr/sqrt(max(images_seen / decay_images, 1)); 0 = off
    # (a constant rate after the warm-up, EDM's). Depends only on the images seen, not the budget.
    c.optim.decay_images = 0
    c.optim.beta1 = 0.9
    c.optim.beta2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 0.0  # global-norm clip; 0 = off (EDM uses none).

    c.ema = ml_collections.ConfigDict()
    c.ema.halflife_images = 50_000
    c.ema.rampup_ratio = 0.05  # EDM's ramp-up; 0 = off.

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # global, split over all devices.
    c.train.total_images = 64_000
    c.train.steps_per_dispatch = 1  # optimiser steps per jitted call (lax.scan).
    # Unroll those steps: required on CPU (XLA runs conv gradients ~40x slower in a rolled
    # loop); False keeps compile time short on GPU/TPU with many steps per dispatch.
    c.train.unroll_dispatch = True
    # Dispatches whose batches a background thread gathers and places ahead of the devices
    # (0 = each batch gathered when its dispatch starts). Runs whose data change between
    # dispatches (online SFBD's buffer) gather synchronously.
    c.train.prefetch_dispatches = 2
    c.train.log_every_steps = 50
    # Seconds between progress lines (phase, round, images, rate, phase and run ETA).
    c.train.progress_every_secs = 30.0
    c.train.checkpoint_every_steps = 250
    c.train.max_checkpoints = 3
    c.train.async_checkpoints = True
    # A damaged latest checkpoint (integrity record mismatch, unreadable) stops the run; True
    # resumes from the newest intact one instead, moving the damaged ones to checkpoints.damaged/.
    c.train.fallback_to_intact_checkpoint = False
    c.train.sample_every_steps = 500  # 0 = only at the end.
    c.train.num_samples = 64
    return c


def _binary_classifier() -> ml_collections.ConfigDict:
    """An Ambient-Omni annotator (models/unet.NoiseClassifier, trained by
    noise_classifier.fit_binary): its network and training settings."""
    k = ml_collections.ConfigDict()
    k.base_channels = 16
    k.channel_mult = (1, 2, 2)
    k.num_blocks = 1
    k.attn_resolutions = ()
    k.channels_per_head = 64
    k.batch_size = 64  # global, half of each class.
    k.steps = 1_500
    k.lr = 1e-3
    k.log_every_steps = 100
    k.seed = 0
    return k
