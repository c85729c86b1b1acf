"""Ambient-Omni annotation (METHODS.md §3.1): a noise-conditional classifier c(x_σ, σ) →
P(corrupted), and σ_min of each low-quality image read off its P(corrupted) over a σ grid.

Training: balanced batches (half clean images, label 0; half low-quality, label 1), σ drawn as
in EDM training (logN(P_mean, P_std) of config.diffusion), x_σ = x + σ·n, binary cross-entropy,
Adam; batch sharded over the mesh, every draw a pure function of (seed, step). The trained
parameters are cached in ``<dir>/<fingerprint>/`` (params.msgpack + meta.json); the fingerprint
covers the classifier config, σ distribution and the prepared data's settings and counts.

Annotation: for each low-quality image, P(corrupted) at every σ of a sorted log-spaced grid,
averaged over ``num_draws`` noise draws (noise streams per image index, so batching does not
change the result), smoothed by a moving average along the grid; σ_min is the first grid
level where the smoothed P < 0.5 + ε, the largest level when there is none.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization

from sfbd_jax.models import precond, unet
from sfbd_jax.utils import devices, integrity, jsonfile


def build_model(cfg, image_size: int) -> unet.NoiseClassifier:
    """The classifier of ``config.ambient.classifier`` for (image_size, image_size) images."""
    levels = len(cfg.channel_mult)
    if image_size % (2 ** (levels - 1)):
        raise ValueError(f"image size {image_size} is not divisible by 2**(levels-1) for "
                         f"config.ambient.classifier.channel_mult={tuple(cfg.channel_mult)}")
    return unet.NoiseClassifier(image_size=image_size, base_channels=cfg.base_channels,
                                channel_mult=tuple(cfg.channel_mult), num_blocks=cfg.num_blocks,
                                attn_resolutions=tuple(cfg.attn_resolutions),
                                channels_per_head=cfg.channels_per_head)


def make_logits_fn(model: unet.NoiseClassifier, sigma_data: float):
    """``logits(params, x_σ (B,H,W,C), σ (B,)) -> (B,)`` with EDM's input scaling c_in and
    noise label c_noise = ln(σ)/4."""

    def logits(params, x, sigma):
        _, _, c_in, c_noise = precond.edm_coefficients(sigma, sigma_data)
        return model.apply({"params": params}, c_in[:, None, None, None] * x, c_noise)

    return logits


def fingerprint(config, data_settings: dict, counts: dict, data_digest: str = "") -> str:
    """Identifies a trained classifier: its config, the σ distribution, the data (its settings
    and, as ``data_digest``, the checksums of its shards)."""
    record = {"classifier": config.ambient.classifier.to_dict(),
              "diffusion": config.diffusion.to_dict(), "data": data_settings, "counts": counts,
              "image_shape": [config.data.image_size, config.data.channels],
              "shards": data_digest}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def _draw_batch(seed: int, step: int, half: int, n_clean: int, n_bad: int, p_mean: float,
                p_std: float):
    rng = np.random.default_rng([seed, 0xC1A55, step])
    clean = rng.integers(0, n_clean, half)
    bad = rng.integers(0, n_bad, half)
    sigma = np.exp(p_mean + p_std * rng.standard_normal(2 * half)).astype(np.float32)
    labels = np.concatenate([np.zeros(half), np.ones(half)]).astype(np.float32)
    return clean, bad, sigma, labels


def train(config, clean: np.ndarray, corrupted: np.ndarray, mesh, writer=None
          ) -> tuple[dict, dict]:
    """Train the classifier on clean (label 0) vs ``corrupted`` (label 1) images, both
    (N, H, W, C) in [-1, 1] (corrupted may exceed it). Returns (params, meta)."""
    cfg, dcfg = config.ambient.classifier, config.diffusion
    if len(clean) == 0 or len(corrupted) == 0:
        raise ValueError("the noise-conditional classifier needs clean and low-quality images; "
                         f"got {len(clean)} clean and {len(corrupted)} low-quality")
    if cfg.batch_size % 2 or cfg.steps <= 0:
        raise ValueError("config.ambient.classifier.batch_size must be even and steps > 0")
    model = build_model(cfg, config.data.image_size)
    logits_fn = make_logits_fn(model, dcfg.sigma_data)
    key = jax.random.PRNGKey(cfg.seed)
    params = model.init({"params": jax.random.fold_in(key, 0)},
                        jnp.zeros((1, *clean.shape[1:])), jnp.zeros((1,)))["params"]
    half = cfg.batch_size // 2

    def batch(i):
        ci, bi, sigma, labels = _draw_batch(cfg.seed, i, half, len(clean), len(corrupted),
                                            dcfg.p_mean, dcfg.p_std)
        x = np.concatenate([clean[ci], np.asarray(corrupted[np.sort(bi)], np.float32)])
        return x, sigma, labels

    def noisy(x, sigma, k):
        return x + sigma[:, None, None, None] * jax.random.normal(k, x.shape)

    params, meta = fit_binary(logits_fn, params, batch, cfg, mesh, writer, "noise classifier",
                              "config.ambient.classifier", perturb=noisy)
    meta.update(clean=int(len(clean)), corrupted=int(len(corrupted)))
    return params, meta


def fit_binary(logits_fn, params: dict, batch, cfg, mesh, writer, name: str, config_path: str,
               perturb=None) -> tuple[dict, dict]:
    """Adam on the binary cross-entropy of ``logits_fn(params, x, cond) -> (B,)``; ``batch(i)``
    gives step i's host arrays (x (B, H, W, C), cond (B,), labels (B,) in {0, 1}), sharded over
    ``mesh``; ``perturb(x, cond, key)`` (jitted, e.g. adds noise) is applied on the devices.
    ``cfg``: batch_size, steps, lr, log_every_steps, seed. Returns (host params, meta)."""
    devices.check_divisible(cfg.batch_size, mesh, f"{config_path}.batch_size")
    key = jax.random.PRNGKey(cfg.seed)
    opt = optax.adam(cfg.lr)
    repl, batch_sh = devices.replicated(mesh), devices.batch_sharding(mesh)

    def loss_fn(params, x, cond, labels, k):
        if perturb is not None:
            x = perturb(x, cond, k)
        logits = logits_fn(params, x, cond)
        loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
        return loss, jnp.mean((logits > 0) == (labels > 0.5))

    @jax.jit
    def step(params, opt_state, x, cond, labels, k):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, cond,
                                                                       labels, k)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    params = jax.device_put(params, repl)
    opt_state = jax.device_put(opt.init(params), repl)
    t0, losses, accs = time.time(), [], []
    put = lambda a: jax.device_put(np.asarray(a, np.float32), batch_sh)  # noqa: E731
    for i in range(cfg.steps):
        x, cond, labels = batch(i)
        params, opt_state, loss, acc = step(params, opt_state, put(x), put(cond), put(labels),
                                            jax.random.fold_in(key, 1 + i))
        losses.append(loss)
        accs.append(acc)
        if (i + 1) % cfg.log_every_steps == 0 or i + 1 == cfg.steps:
            recent = slice(-cfg.log_every_steps, None)
            loss_v = float(np.mean(jax.device_get(losses[recent])))
            acc_v = float(np.mean(jax.device_get(accs[recent])))
            logging.info("%s step %d/%d: BCE %.4f, accuracy %.3f (%.0f s)", name, i + 1,
                         cfg.steps, loss_v, acc_v, time.time() - t0)
            if writer is not None:
                tag = name.replace(" ", "_")
                writer.write_scalars(i + 1, {f"{tag}/bce": loss_v, f"{tag}/accuracy": acc_v})
            losses, accs = [], []
    if not np.isfinite(loss_v):
        raise FloatingPointError(f"the {name}'s loss is {loss_v}: lower {config_path}.lr")
    meta = {"final_bce": loss_v, "final_accuracy": acc_v, "seconds": time.time() - t0,
            "steps": int(cfg.steps)}
    return jax.device_get(params), meta


def save(directory: str, params: dict, meta: dict) -> None:
    """params.msgpack + meta.json, each written atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, "params.msgpack.tmp")
    with open(tmp, "wb") as f:
        f.write(serialization.to_bytes(params))
    os.replace(tmp, os.path.join(directory, "params.msgpack"))
    jsonfile.write_json(os.path.join(directory, "meta.json"), meta)
    integrity.write_record(directory)


def load(directory: str, template: dict) -> tuple[dict, dict] | None:
    """(params, meta) saved in ``directory``, None when nothing is there; a damaged file raises
    ValueError naming it (it is left in place)."""
    path = os.path.join(directory, "params.msgpack")
    if not os.path.exists(path) or not os.path.exists(os.path.join(directory, "meta.json")):
        return None
    try:
        integrity.verify_record(directory)
        with open(path, "rb") as f:
            params = serialization.from_bytes(template, f.read())
    except Exception as err:  # msgpack raises several types on damaged bytes
        raise ValueError(f"cannot read the noise classifier {path}: {err}. Delete the folder "
                         "to train it again.") from err
    return params, jsonfile.read_json(os.path.join(directory, "meta.json"), {})


def init_template(config) -> dict:
    model = build_model(config.ambient.classifier, config.data.image_size)
    shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                             jnp.zeros(shape), jnp.zeros((1,)))["params"])


def sigma_grid(cfg) -> np.ndarray:
    """The sorted annotation grid: ``num_sigmas`` levels log-spaced in [sigma_lo, sigma_hi]."""
    if not 0 < cfg.sigma_lo < cfg.sigma_hi or cfg.num_sigmas < 2:
        raise ValueError("config.ambient.annotate needs 0 < sigma_lo < sigma_hi and "
                         "num_sigmas >= 2")
    return np.geomspace(cfg.sigma_lo, cfg.sigma_hi, cfg.num_sigmas)


def probabilities(config, params: dict, images, indices: np.ndarray, mesh) -> np.ndarray:
    """P(corrupted) (N, S) of ``images`` (N, H, W, C) over ``sigma_grid``, the mean over
    ``num_draws`` noise draws; the noise of image i comes from fold_in(key, indices[i])."""
    cfg = config.ambient.annotate
    grid = jnp.asarray(sigma_grid(cfg), jnp.float32)
    model = build_model(config.ambient.classifier, config.data.image_size)
    logits_fn = make_logits_fn(model, config.diffusion.sigma_data)
    key = jax.random.PRNGKey(cfg.seed)
    devices.check_divisible(cfg.batch_size, mesh, "config.ambient.annotate.batch_size")
    batch_sh, repl = devices.batch_sharding(mesh), devices.replicated(mesh)

    def one_image_noise(index):
        k = jax.random.fold_in(key, index)
        return jax.random.normal(k, (grid.shape[0], cfg.num_draws, *images.shape[1:]))

    @functools.partial(jax.jit, out_shardings=repl)  # every host gets every row
    def batch_probs(params, x, idx):
        noise = jax.vmap(one_image_noise)(idx)  # (B, S, D, H, W, C)

        def at_level(args):
            sigma, noise_s = args  # (), (B, D, H, W, C)
            xs = x[:, None] + sigma * noise_s
            flat = xs.reshape(-1, *x.shape[1:])
            logits = logits_fn(params, flat, jnp.full((flat.shape[0],), sigma))
            return jax.nn.sigmoid(logits).reshape(x.shape[0], cfg.num_draws).mean(axis=1)

        return jax.lax.map(at_level, (grid, jnp.moveaxis(noise, 1, 0))).T  # (B, S)

    params = jax.device_put(params, repl)
    out = []
    b = cfg.batch_size
    t0 = t_log = time.time()
    for start in range(0, len(images), b):
        chunk = np.asarray(images[np.arange(start, min(start + b, len(images)))], np.float32)
        idx = np.asarray(indices[start:start + b], np.uint32)
        pad = b - len(chunk)
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
        idx = np.concatenate([idx, np.zeros(pad, np.uint32)])
        p = batch_probs(params, jax.device_put(chunk, batch_sh), jax.device_put(idx, batch_sh))
        out.append(np.asarray(jax.device_get(p))[:b - pad])
        if time.time() - t_log > 30:
            t_log = time.time()
            done = start + b - pad
            logging.info("annotation: %d / %d images (%.0f s, %.0f images/s)", done,
                         len(images), t_log - t0, done / (t_log - t0))
    return np.concatenate(out)


def smooth(probs: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of width ``window`` (odd) along the σ axis, edges replicated."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"config.ambient.annotate.smooth_window must be odd and >= 1, "
                         f"got {window}")
    if window == 1:
        return probs
    r = window // 2
    padded = np.concatenate([np.repeat(probs[:, :1], r, 1), probs,
                             np.repeat(probs[:, -1:], r, 1)], axis=1)
    kernel = np.ones(window) / window
    return np.stack([np.convolve(row, kernel, mode="valid") for row in padded])


def sigma_min_from_probabilities(probs: np.ndarray, grid: np.ndarray, epsilon: float,
                                 window: int) -> np.ndarray:
    """(N,) σ_min: the first grid level where the smoothed P(corrupted) < 0.5 + ε; the
    largest level when it never drops that low (METHODS.md §3.1)."""
    smoothed = smooth(np.asarray(probs, np.float64), window)
    below = smoothed < 0.5 + epsilon
    first = np.where(below.any(axis=1), np.argmax(below, axis=1), len(grid) - 1)
    return np.asarray(grid, np.float64)[first]
