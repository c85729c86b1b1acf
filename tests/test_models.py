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
