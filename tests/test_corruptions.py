"""Each corruption's effect, checked numerically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfbd_jax import corruptions


def smooth_images(n=16, size=16, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, size, size, channels)).astype(np.float32)
    return x


def high_freq_energy(images):
    f = np.fft.fft2(np.asarray(images)[..., 0])
    h = images.shape[1]
    fy = np.abs(np.fft.fftfreq(h))[:, None]
    fx = np.abs(np.fft.fftfreq(h))[None, :]
    return float(np.mean(np.abs(f[:, (fy > 0.25) | (fx > 0.25)]) ** 2))


def test_additive_noise_std_and_per_index_streams():
    x = np.zeros((64, 16, 16, 1), np.float32)
    y = corruptions.add_gaussian_noise(jnp.asarray(x), 0.2, jax.random.PRNGKey(0))
    assert float(jnp.std(y)) == pytest.approx(0.2, rel=0.02)
    assert float(jnp.mean(y)) == pytest.approx(0.0, abs=0.005)
    # Example 5's noise is the same whether it comes alone or in a batch.
    alone = corruptions.add_gaussian_noise(jnp.asarray(x[:1]), 0.2, jax.random.PRNGKey(0),
                                           jnp.array([5]))
    np.testing.assert_allclose(alone[0], y[5], rtol=1e-6)
    with pytest.raises(ValueError):
        corruptions.add_gaussian_noise(jnp.asarray(x), -1.0, jax.random.PRNGKey(0))


def test_gaussian_blur_removes_high_frequencies_monotonically():
    x = smooth_images()
    energies = [high_freq_energy(np.asarray(corruptions.gaussian_blur(jnp.asarray(x), s)))
                for s in (0.0, 0.4, 0.6, 0.8, 1.0)]
    assert all(a > b for a, b in zip(energies, energies[1:], strict=False))
    assert energies[-1] < 0.2 * energies[0]
    blurred = np.asarray(corruptions.gaussian_blur(jnp.asarray(x), 1.0))
    assert blurred.mean() == pytest.approx(x.mean(), abs=0.01)  # the kernel sums to one


def test_motion_blur_kernel_and_effect():
    k = corruptions.motion_blur_kernel(5, 0.0)
    assert k.shape == (5, 5) and k.sum() == pytest.approx(1.0)
    assert np.allclose(k[2], k.max(axis=0)) and k[0].sum() == 0  # horizontal line
    kv = corruptions.motion_blur_kernel(5, 90.0)
    np.testing.assert_allclose(kv, k.T, atol=1e-6)
    x = smooth_images()
    out = np.asarray(corruptions.motion_blur(jnp.asarray(x), 5, 0.0))
    assert high_freq_energy(out) < 0.5 * high_freq_energy(x)
    # Horizontal blur leaves vertical differences far larger than horizontal ones.
    assert np.abs(np.diff(out, axis=1)).mean() > 2 * np.abs(np.diff(out, axis=2)).mean()


def test_jpeg_error_falls_with_quality():
    x = np.asarray(corruptions.gaussian_blur(jnp.asarray(smooth_images(channels=3)), 0.6))
    errors = [float(np.mean((corruptions.jpeg(x, q) - x) ** 2)) for q in (10, 30, 60, 90)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert corruptions.jpeg(x, 50).shape == x.shape
    with pytest.raises(ValueError, match="quality"):
        corruptions.jpeg(x, 0)


def test_label_flip_fraction_and_never_the_original():
    labels = np.repeat(np.arange(10), 100)
    new, flipped = corruptions.corrupt_labels(labels, 0.1, 10, seed=0)
    assert flipped.sum() == 100
    assert np.all(new[flipped] != labels[flipped])
    np.testing.assert_array_equal(new[~flipped], labels[~flipped])
    # Symmetric: the new classes are spread over the other 9 classes.
    counts = np.bincount(new[flipped], minlength=10)
    assert counts.max() <= 25
    again, _ = corruptions.corrupt_labels(labels, 0.1, 10, seed=0)
    np.testing.assert_array_equal(new, again)
    other, _ = corruptions.corrupt_labels(labels, 0.1, 10, seed=1)
    assert not np.array_equal(new, other)


def test_apply_corruption_dispatch():
    x = smooth_images(n=4)
    idx = np.arange(4)
    key = jax.random.PRNGKey(0)
    y = corruptions.apply_corruption(x, {"type": "gaussian_noise", "sigma": 0.5}, key, idx)
    assert np.std(y - x) == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corruptions.apply_corruption(x, {"type": "nope"}, key, idx)


def test_chunks_of_varying_sizes_compile_once_and_match_eager_rows():
    """Preparation speed: chunks of any size are padded to one shape (one compilation per
    corruption), and every row equals the unpadded computation for that image and index."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (50, 8, 8, 1)).astype(np.float32)
    spec = {"type": "gaussian_noise", "sigma": 0.3}
    key = jax.random.PRNGKey(7)
    before = corruptions._corrupt_jit._cache_size()
    parts, start = [], 0
    for n in (10, 37, 3):
        idx = np.arange(start, start + n) + 100
        parts.append(corruptions.apply_corruption(images[start:start + n], spec, key, idx,
                                                  pad_to=64))
        start += n
    assert corruptions._corrupt_jit._cache_size() == before + 1
    eager = corruptions.add_gaussian_noise(jnp.asarray(images), 0.3, key,
                                           jnp.arange(100, 150))
    np.testing.assert_allclose(np.concatenate(parts), np.asarray(eager), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        corruptions.apply_corruption(images, {"type": "gaussian_noise", "sigma": -1.0}, key,
                                     np.arange(50))
