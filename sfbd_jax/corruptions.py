"""Corruptions of images in [-1, 1] (N, H, W, C) and of class labels, each parameterised.

Additive noise, Gaussian blur and motion blur are jittable JAX functions; JPEG goes through
Pillow on the host. Randomness comes from explicit keys/seeds; the additive noise of example
``i`` is drawn from ``fold_in(key, i)`` so it does not depend on batching or sharding.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# ----- additive Gaussian noise (the SFBD setting) -------------------------------------------


def noise_for_indices(key: jax.Array, indices: jax.Array, image_shape: tuple[int, ...]
                      ) -> jax.Array:
    """Standard normal noise (len(indices), *image_shape); row r depends only on (key,
    indices[r]), so the one-time noise of an image is the same however the data is chunked."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), image_shape))(
        jnp.asarray(indices, jnp.uint32))


def add_gaussian_noise(images: jax.Array, sigma: float, key: jax.Array,
                       indices: jax.Array | None = None) -> jax.Array:
    """y = x + σ·ε, unclipped (σ on the [-1, 1] scale). ``indices`` (N,) name the examples
    (default 0..N−1) for per-example noise streams."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0, got {sigma}")
    if indices is None:
        indices = jnp.arange(images.shape[0])
    eps = noise_for_indices(key, indices, images.shape[1:])
    return images + sigma * eps.astype(images.dtype)


# ----- blurs (depthwise convolutions with reflected borders) --------------------------------


def _depthwise_conv(images: jax.Array, kernel: jax.Array) -> jax.Array:
    """Convolve every channel of (N, H, W, C) with the same (kh, kw) kernel, reflect padding."""
    kh, kw = kernel.shape
    c = images.shape[-1]
    padded = jnp.pad(images, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)),
                     mode="reflect")
    rhs = jnp.tile(kernel[:, :, None, None], (1, 1, 1, c)).astype(images.dtype)
    return jax.lax.conv_general_dilated(padded, rhs, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=c)


def gaussian_kernel1d(sigma_px: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps of std ``sigma_px`` pixels, radius ⌈3σ⌉."""
    radius = max(int(math.ceil(3 * sigma_px)), 1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(images: jax.Array, sigma_px: float) -> jax.Array:
    """Gaussian blur with std ``sigma_px`` pixels (Ambient-Omni uses 0.4–1.0); 0 = identity."""
    if sigma_px < 0:
        raise ValueError(f"blur sigma must be >= 0 pixels, got {sigma_px}")
    if sigma_px == 0:
        return images
    k = jnp.asarray(gaussian_kernel1d(sigma_px))
    if 2 * (k.shape[0] // 2) >= min(images.shape[1:3]):
        raise ValueError(f"blur sigma {sigma_px} px is too large for {images.shape[1:3]} images")
    out = _depthwise_conv(images, k[:, None])
    return _depthwise_conv(out, k[None, :])


def motion_blur_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised (L, L) line kernel of ``length`` pixels at ``angle_deg`` (0 = horizontal),
    L = length rounded up to odd; the line is drawn with bilinear weights."""
    if length < 1:
        raise ValueError(f"motion blur length must be >= 1 pixel, got {length}")
    size = length + 1 - length % 2
    kernel = np.zeros((size, size), np.float64)
    c = size // 2
    theta = math.radians(angle_deg)
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length):
        x, y = c + t * math.cos(theta), c - t * math.sin(theta)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                if 0 <= xi < size and 0 <= yi < size:
                    kernel[yi, xi] += (1 - abs(x - xi)) * (1 - abs(y - yi))
    return (kernel / kernel.sum()).astype(np.float32)


def motion_blur(images: jax.Array, length: int, angle_deg: float) -> jax.Array:
    """Linear motion blur over ``length`` pixels at ``angle_deg`` degrees."""
    kernel = motion_blur_kernel(length, angle_deg)
    if kernel.shape[0] // 2 >= min(images.shape[1:3]):
        raise ValueError(f"motion blur length {length} is too large for {images.shape[1:3]}")
    return _depthwise_conv(images, jnp.asarray(kernel))


# ----- JPEG (host, Pillow) ------------------------------------------------------------------


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """Re-compress every image as JPEG at ``quality`` (1–95) and decode it; float32 [-1, 1]."""
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must lie in 1..95, got {quality}")
    images = np.asarray(images, np.float32)
    u8 = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    out = np.empty_like(u8)
    for i, img in enumerate(u8):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out[i] = decoded.reshape(img.shape)
    return out.astype(np.float32) / 127.5 - 1.0


# ----- labels -------------------------------------------------------------------------------


def corrupt_labels(labels: np.ndarray, eta: float, num_classes: int, seed: int,
                   class_prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly round(η·N) labels, chosen at random, each to another class drawn from the
    class prior restricted to the other classes (symmetric flipping for a uniform prior).

    Returns (new_labels, flipped_mask). ``class_prior`` defaults to the empirical frequencies.
    """
    labels = np.asarray(labels, np.int64)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"label corruption fraction eta must lie in [0, 1], got {eta}")
    if num_classes < 2:
        raise ValueError("label corruption needs at least 2 classes")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, "
                         f"{labels.max()}]")
    prior = (np.bincount(labels, minlength=num_classes).astype(np.float64)
             if class_prior is None else np.asarray(class_prior, np.float64))
    prior = prior / prior.sum()
    rng = np.random.default_rng(seed)
    n_flip = int(round(eta * labels.size))
    chosen = rng.permutation(labels.size)[:n_flip]
    new = labels.copy()
    for i in chosen:
        p = prior.copy()
        p[labels[i]] = 0.0
        if p.sum() == 0:  # the prior has mass on this class only: fall back to uniform others
            p = np.ones(num_classes)
            p[labels[i]] = 0.0
        new[i] = rng.choice(num_classes, p=p / p.sum())
    flipped = np.zeros(labels.size, bool)
    flipped[chosen] = True
    return new.astype(np.int32), flipped


# ----- dispatch from a config ---------------------------------------------------------------

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg", "motion_blur")


def _corrupt(x: jax.Array, key: jax.Array, indices: jax.Array, kind: str,
             params: tuple[tuple[str, Any], ...]) -> jax.Array:
    p = dict(params)
    if kind == "gaussian_noise":
        return add_gaussian_noise(x, p["sigma"], key, indices)
    if kind == "gaussian_blur":
        return gaussian_blur(x, p["sigma_px"])
    return motion_blur(x, p["length"], p["angle_deg"])


_corrupt_jit = jax.jit(_corrupt, static_argnames=("kind", "params"))


def padded_rows(n: int) -> int:
    """The row count a chunk of ``n`` images is padded to (the next power of two, at least 64):
    few distinct shapes, so few compilations, whatever the chunk sizes."""
    return max(64, 1 << max(n - 1, 0).bit_length())


def apply_corruption(images: np.ndarray, spec: Mapping[str, Any], key: jax.Array,
                     indices: np.ndarray, pad_to: int | None = None) -> np.ndarray:
    """Apply the corruption ``spec`` (``type`` plus its parameters, e.g. {type:
    'gaussian_noise', sigma: 0.2}) to host images; returns float32 host images.

    One jitted program per (corruption, padded shape): the rows are padded to ``pad_to`` (e.g.
    the preparation's chunk size; default ``padded_rows(N)``), so chunks of varying sizes do
    not each compile anew. Row r's result depends only on image r and ``indices[r]``."""
    kind = spec["type"]
    if kind == "jpeg":
        return jpeg(images, int(spec["quality"]))
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption type {kind!r}; known: {CORRUPTIONS}")
    params = {"gaussian_noise": (("sigma", float(spec.get("sigma", 0.0))),),
              "gaussian_blur": (("sigma_px", float(spec.get("sigma_px", 0.0))),),
              "motion_blur": (("length", int(spec.get("length", 1))),
                              ("angle_deg", float(spec.get("angle_deg", 0.0))))}[kind]
    for name, value in params:  # the argument checks, outside the traced function
        if name in ("sigma", "sigma_px") and value < 0:
            raise ValueError(f"{kind} {name} must be >= 0, got {value}")
        if name == "length" and value < 1:
            raise ValueError(f"motion blur length must be >= 1 pixel, got {value}")
    n = len(images)
    rows = max(pad_to or 0, padded_rows(n))
    x = np.zeros((rows, *images.shape[1:]), np.float32)
    x[:n] = images
    idx = np.zeros(rows, np.int64)
    idx[:n] = indices
    out = _corrupt_jit(jnp.asarray(x), key, jnp.asarray(idx), kind=kind, params=params)
    return np.asarray(out, np.float32)[:n]  # sliced on the host: no compilation per n


# ----- mixed-corruption pools ---------------------------------------------------------------

MIXTURE_TYPES = CORRUPTIONS + ("ood",)
_PARAM_TYPES = {"sigma": float, "sigma_px": float, "quality": int, "length": int,
                "angle_deg": float, "weight": float}
_NEEDED = {"gaussian_noise": ("sigma",), "gaussian_blur": ("sigma_px",), "jpeg": ("quality",),
           "motion_blur": ("length", "angle_deg"), "ood": ()}


def parse_mixture(spec: str) -> list[dict]:
    """``corrupt.mixture`` → components, e.g. ``"gaussian_blur:sigma_px=0.8; jpeg:quality=20,
    weight=2; motion_blur:length=5,angle_deg=30; gaussian_noise:sigma=0.2; ood"`` →
    [{"type": "gaussian_blur", "sigma_px": 0.8, "weight": 1.0}, …]. Each non-clean source image
    gets one corruption component, drawn with probability ∝ weight (default 1); ``ood`` adds
    the out-of-distribution pool of corrupt.ood_* as a component of its own (every pool image,
    its weight unused). Bad input raises ValueError naming the component."""
    components = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        kind, _, args = part.partition(":")
        kind = kind.strip()
        if kind not in MIXTURE_TYPES:
            raise ValueError(f"corrupt.mixture component {part!r}: unknown type {kind!r}; "
                             f"known: {MIXTURE_TYPES}")
        component: dict = {"type": kind, "weight": 1.0}
        for item in (a.strip() for a in args.split(",") if a.strip()):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in _NEEDED[kind] + ("weight",):
                raise ValueError(f"corrupt.mixture component {part!r}: {item!r} is not one of "
                                 f"{_NEEDED[kind] + ('weight',)} as key=value")
            try:
                component[key] = _PARAM_TYPES[key](value)
            except ValueError as err:
                raise ValueError(f"corrupt.mixture component {part!r}: {item!r}: {err}") from err
        missing = [k for k in _NEEDED[kind] if k not in component]
        if missing:
            raise ValueError(f"corrupt.mixture component {part!r} needs {missing}")
        if not component["weight"] > 0:
            raise ValueError(f"corrupt.mixture component {part!r}: weight must be > 0")
        components.append(component)
    if not components:
        raise ValueError("config.corrupt.type='mixed' needs config.corrupt.mixture, e.g. "
                         "'gaussian_blur:sigma_px=0.8; jpeg:quality=20'")
    if sum(c["type"] == "ood" for c in components) > 1:
        raise ValueError("corrupt.mixture lists 'ood' more than once")
    if all(c["type"] == "ood" for c in components):
        raise ValueError("corrupt.mixture needs a corruption besides 'ood' (else use "
                         "corrupt.type='ood')")
    return components


def mixture_assignment(num_examples: int, components: list[dict], seed: int) -> np.ndarray:
    """(num_examples,) the component of every source position (among the non-'ood' ones, by
    weight), drawn once from ``seed``: chunking and sharding do not change it."""
    which = [i for i, c in enumerate(components) if c["type"] != "ood"]
    weights = np.asarray([components[i]["weight"] for i in which], np.float64)
    rng = np.random.default_rng([seed, 0x313D])
    return np.asarray(which, np.int32)[rng.choice(len(which), num_examples,
                                                  p=weights / weights.sum())]
