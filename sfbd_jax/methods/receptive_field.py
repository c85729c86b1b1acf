"""The denoiser's effective receptive field per noise level (Ambient-Omni locality, §3.3).

At level σ the output of D(x_σ; σ) at a pixel depends mostly on a neighbourhood of it; its size
grows with σ (small σ: a few pixels; large σ: the whole image). Measured on data: for images x
and draws n, x_σ = x + σ·n, the gradient of the centre output pixel (summed over channels) with
respect to x_σ, its absolute value summed over input channels and averaged over images and
draws: a map g_σ (H, W). The *radius* at σ is the smallest r whose centred square
{|i − i_c| ≤ r, |j − j_c| ≤ r} holds ``mass`` (e.g. 90%) of Σ g_σ; the *crop size* is 2r + 1
(at most the image side). ``locality.py`` turns the crop size at σ into σ_max per image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sfbd_jax.models.precond import DenoiseFn


def centre(height: int, width: int) -> tuple[int, int]:
    """The output pixel whose gradient is measured: (H // 2, W // 2)."""
    return height // 2, width // 2


def gradient_maps(denoise: DenoiseFn, params, images: np.ndarray, sigmas: np.ndarray,
                  key: jax.Array, draws: int = 1, labels: np.ndarray | None = None
                  ) -> np.ndarray:
    """(S, H, W) mean |∂ Σ_c D(x_σ; σ)[i_c, j_c, c] / ∂x_σ| (summed over input channels) at
    each σ of ``sigmas`` (S,), over ``images`` (N, H, W, C) in [-1, 1] and ``draws`` noise draws
    each. The noise of level s, draw d is ``normal(fold_in(fold_in(key, s), d))``."""
    images = jnp.asarray(images, jnp.float32)
    n, h, w, _ = images.shape
    ic, jc = centre(h, w)
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)

    def centre_output(x, sigma):
        out = denoise(params, x, jnp.full((n,), sigma), labels)
        return out[:, ic, jc, :].sum()  # the examples are independent: one backward pass

    @jax.jit
    def one_level(sigma, k):
        def one_draw(acc, d):
            x = images + sigma * jax.random.normal(jax.random.fold_in(k, d), images.shape)
            g = jax.grad(centre_output)(x, sigma)
            return acc + jnp.abs(g).sum(axis=-1).mean(axis=0), None

        total, _ = jax.lax.scan(one_draw, jnp.zeros((h, w)), jnp.arange(draws))
        return total / draws

    return np.stack([np.asarray(one_level(jnp.float32(s), jax.random.fold_in(key, i)))
                     for i, s in enumerate(np.asarray(sigmas, np.float64))])


def radius_for_mass(gradient_map: np.ndarray, mass: float) -> int:
    """The smallest r such that the square of half-width r around ``centre`` holds at least
    ``mass`` (0 < mass ≤ 1) of the map's total; 0 for an all-zero map."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"the receptive-field mass must be in (0, 1], got {mass}")
    g = np.abs(np.asarray(gradient_map, np.float64))
    h, w = g.shape
    ic, jc = centre(h, w)
    total = g.sum()
    if total == 0:
        return 0
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    chebyshev = np.maximum(np.abs(rows - ic), np.abs(cols - jc))
    inside = np.bincount(chebyshev.ravel(), weights=g.ravel()).cumsum() / total
    # Rounding: a mass of 1.0 is reached at the support's radius, not one float step later.
    return int(np.argmax(inside >= mass - 1e-9))


def crop_size(radius: int, image_side: int) -> int:
    """2·radius + 1, at most ``image_side``."""
    return int(min(2 * radius + 1, image_side))


def curve(denoise: DenoiseFn, params, images: np.ndarray, sigmas: np.ndarray, key: jax.Array,
          mass: float, draws: int = 1, labels: np.ndarray | None = None) -> dict:
    """The receptive-field curve over ``sigmas`` (increasing): ``{"sigmas", "radii",
    "crop_sizes", "mass"}`` as lists (for JSON records). Crop sizes are made non-decreasing
    in σ (a running maximum: the measured radius can dip by a pixel between levels, and a
    smaller crop at a larger σ would let an image be used where a smaller level forbids it)."""
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or not np.all(np.diff(sigmas) > 0) or sigmas[0] <= 0:
        raise ValueError("the receptive-field grid must be positive and increasing")
    maps = gradient_maps(denoise, params, images, sigmas, key, draws, labels)
    if not np.isfinite(maps).all():
        raise FloatingPointError("the denoiser's input gradient is not finite: is the "
                                 "denoiser's checkpoint intact?")
    radii = [radius_for_mass(m, mass) for m in maps]
    side = min(images.shape[1:3])
    sizes = np.maximum.accumulate([crop_size(r, side) for r in radii])
    return {"sigmas": sigmas.tolist(), "radii": radii, "crop_sizes": sizes.tolist(),
            "mass": float(mass)}


def plot(record: dict, path: str, title: str = "") -> None:
    """Crop size against σ (log axis) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.step(record["sigmas"], record["crop_sizes"], where="mid", marker="o", ms=3)
    ax.set_xscale("log")
    ax.set_xlabel("σ (image scale [-1, 1])")
    ax.set_ylabel(f"crop size holding {record['mass']:.0%} (px)")
    ax.set_title(title or "denoiser receptive field")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
