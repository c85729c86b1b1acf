"""Every config file loads, passes the checks and builds its network (shapes only)."""

import importlib

import jax
import numpy as np
import pytest

from sfbd_jax.config_checks import validate_config
from sfbd_jax.models import precond, unet

CASES = [("default", None), ("mnist_edm", None), ("demo", None), ("cifar10_sfbd", ""),
         ("cifar10_sfbd", "frac4"), ("cifar10_sfbd", "frac10"), ("celeba64_sfbd", ""),
         ("celeba64_sfbd", "sigma1.38"), ("ambient_mnist", "blur"), ("ambient_mnist", "jpeg"),
         ("ambient_mnist", "motion"), ("ambient_mnist", "noise"), ("ambient_mnist", "smoke"),
         ("ambient_cifar10", "blur0.4"), ("ambient_cifar10", "blur1.0"),
         ("ambient_cifar10", "jpeg"), ("cep_mnist", "clean"), ("cep_mnist", "flip20"),
         ("cep_mnist", "cep_u"), ("cep_mnist", "cep_g"), ("cep_mnist", "smoke"),
         *[("ambient_ood_mnist", v) for v in ("clean_only", "naive", "locality_fixed",
                                              "locality_crops", "mixed", "mixed_classifier", "both",
                                              "smoke")],
         *[("ambient_ood_cifar10", v) for v in ("crops", "both", "naive", "clean_only")]]


@pytest.mark.parametrize("name,variant", CASES)
def test_config_builds(name, variant):
    module = importlib.import_module(f"configs.{name}")
    c = module.get_config() if variant is None else module.get_config(variant)
    validate_config(c)
    model = unet.build_unet(c.model, c.data.image_size, c.data.channels)
    shape = (c.data.image_size, c.data.image_size, c.data.channels)
    params = jax.eval_shape(lambda k: precond.init_params(model, k, shape,
                                                          c.model.num_classes > 0),
                            jax.random.PRNGKey(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) > 0
    if name.endswith("_sfbd"):
        assert c.corrupt.sigma in (0.2, 0.59, 1.38)
        assert c.sfbd.denoise_shard_size % c.sfbd.denoise_batch_size == 0
    if name.startswith("ambient_"):  # the annotation classifier builds too
        from sfbd_jax.methods import noise_classifier

        noise_classifier.build_model(c.ambient.classifier, c.data.image_size)
        noise_classifier.build_model(c.ambient.crop_classifier, c.data.image_size)
        noise_classifier.sigma_grid(c.ambient.annotate)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown cifar10_sfbd variant"):
        importlib.import_module("configs.cifar10_sfbd").get_config("frac7")
