"""The U-Net: paper sizes from config alone, tiny forward passes, conditioning hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from configs import networks
from sfbd_jax.models import precond, unet


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(model_config, size, channels=3):
    model = unet.build_unet(model_config, size, channels)
    return jax.eval_shape(
        lambda k: precond.init_params(model, k, (size, size, channels),
                                      model_config.num_classes > 0), jax.random.PRNGKey(0))


def test_paper_networks_from_config():
    # EDM reports 55.73 M parameters for its CIFAR-10 DDPM++.
    assert count(abstract_params(networks.ddpmpp_cifar10(), 32)) == pytest.approx(55.73e6,
                                                                                    rel=1e-3)
    celeba = abstract_params(networks.ncsnpp_celeba64(), 64)
    assert 50e6 < count(celeba) < 80e6
    assert "enc8_block0" in celeba and "attn" in celeba["enc16_block0"]


def _group_norm(x, scale, bias, groups, eps=1e-6):
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


@pytest.mark.parametrize("num_heads", [1, 4])
def test_attention_layer_matches_a_hand_written_attention(num_heads):
    """SelfAttention against NumPy: GN → 1×1 qkv → softmax(q·kᵀ/√d) v per head → 1×1 proj,
    residual scaled by √0.5. One head is EDM's SongUNet (DDPM++, NCSN++)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 32)).astype(np.float32)
    layer = unet.SelfAttention(channels_per_head=64, num_heads=num_heads)
    params = layer.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    # The output projection starts at zero (EDM's init): give it values to see the attention.
    params = jax.tree.map(np.asarray, params)
    params["proj"]["kernel"] = rng.normal(size=params["proj"]["kernel"].shape).astype(np.float32)
    got = np.asarray(layer.apply({"params": params}, jnp.asarray(x)))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n, c, d = 16, 32, 32 // num_heads
    h = _group_norm(x.astype(np.float64), p["GroupNorm_0"]["scale"], p["GroupNorm_0"]["bias"], 8)
    qkv = h.reshape(2, n, c) @ p["qkv"]["kernel"][0, 0] + p["qkv"]["bias"]
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(2, n, num_heads, d) for i in range(3))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    a = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, n, c)
    a = a @ p["proj"]["kernel"][0, 0] + p["proj"]["bias"]
    want = (x + a.reshape(x.shape)) * np.sqrt(0.5)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert unet.attention_heads(32, num_heads, 64) == num_heads


def test_paper_networks_use_one_attention_head_as_edm():
    for preset in (networks.ddpmpp_cifar10(), networks.ncsnpp_celeba64()):
        assert preset.num_heads == 1
        assert unet.build_unet(preset, 32, 3).num_heads == 1
    assert unet.attention_heads(256, 0, 64) == 4  # the ADM rule when num_heads = 0
    with pytest.raises(ValueError, match="do not split into 3 attention heads"):
        unet.attention_heads(32, 3, 64)


def test_image_size_must_fit_the_levels():
    with pytest.raises(ValueError, match="not divisible"):
        unet.build_unet(networks.ncsnpp_celeba64(), 36, 3)


def small_model(num_classes=0):
    c = tiny_config()
    c.model.num_classes = num_classes
    model = unet.build_unet(c.model, 8, 1)
    init = jax.jit(lambda k: precond.init_params(model, k, (8, 8, 1), num_classes > 0))
    return model, init(jax.random.PRNGKey(0))


def test_forward_shapes_and_dropout_rng():
    model, params = small_model()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
    y = jax.jit(model.apply)({"params": params}, x, jnp.zeros(3))
    assert y.shape == (3, 8, 8, 1) and np.all(np.isfinite(y))


def test_class_conditioning_and_embedding_perturbation_hook():
    model, params = small_model(num_classes=3)
    # Non-zero weights everywhere so the label path reaches the output at initialisation.
    params = jax.tree.map(lambda p: p + 0.05, params)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    apply = jax.jit(lambda labels, noise: model.apply(
        {"params": params}, x, jnp.zeros(2), labels, label_embedding_noise=noise))
    f = lambda labels, noise=None: apply(labels, noise)
    a, b = f(jnp.array([0, 0])), f(jnp.array([1, 1]))
    assert not np.allclose(a, b)
    delta = jnp.full((2, params["map_label"]["embedding"].shape[1]), 0.3)
    assert not np.allclose(f(jnp.array([0, 0]), delta), a)
    with pytest.raises(ValueError, match="class-conditional"):
        f(None)


def test_fourier_frequencies_are_not_trained():
    c = tiny_config()
    c.model.embedding_type = "fourier"
    model = unet.build_unet(c.model, 8, 1)
    params = jax.jit(lambda k: precond.init_params(model, k, (8, 8, 1), False))(
        jax.random.PRNGKey(0))
    x = jnp.ones((2, 8, 8, 1))
    grads = jax.jit(jax.grad(
        lambda p: jnp.sum(model.apply({"params": p}, x, jnp.ones(2)) ** 2)))(params)
    assert np.all(np.asarray(grads["map_noise"]["freqs"]) == 0)


def test_denoiser_is_skip_connection_at_small_sigma():
    """D(x; σ→0) → x: c_skip → 1 and c_out → 0 whatever F outputs."""
    model, params = small_model()
    denoise = precond.make_denoiser(model, 0.5)
    x = jax.random.uniform(jax.random.PRNGKey(2), (2, 8, 8, 1), minval=-1, maxval=1)
    out = jax.jit(denoise)(params, x, jnp.full((2,), 1e-4))
    np.testing.assert_allclose(out, x, atol=1e-3)
