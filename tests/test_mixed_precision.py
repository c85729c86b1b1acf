"""model.compute_dtype='bfloat16': bf16 convolutions/matmuls/activations, float32 parameters,
loss and preconditioning skip path; training still works."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from test_training import eval_loss, experiment, run_steps, tiny_dataset

from sfbd_jax.config_checks import validate_config
from sfbd_jax.models import precond, unet
from sfbd_jax.utils import devices


def _model_and_params(dtype):
    c = tiny_config()
    c.model.compute_dtype = dtype
    model = unet.build_unet(c.model, 8, 1)
    params = jax.jit(lambda k: precond.init_params(model, k, (8, 8, 1), False))(
        jax.random.PRNGKey(0))
    return model, params


def test_parameters_stay_float32_and_match_the_float32_model():
    _, p32 = _model_and_params("float32")
    _, p16 = _model_and_params("bfloat16")
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.float32)}
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16), strict=True):
        np.testing.assert_array_equal(a, b)


def _conv_and_dot_input_dtypes(model, params):
    x = jnp.ones((2, 8, 8, 1))
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, jnp.zeros(2)))(params)
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                found.append({v.aval.dtype for v in eqn.invars})
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_every_convolution_and_matmul_runs_in_bfloat16():
    model, params = _model_and_params("bfloat16")
    dtypes = _conv_and_dot_input_dtypes(model, params)
    assert len(dtypes) > 10
    assert all(d == {jnp.dtype(jnp.bfloat16)} for d in dtypes), dtypes
    model32, _ = _model_and_params("float32")
    assert all(d == {jnp.dtype(jnp.float32)}
               for d in _conv_and_dot_input_dtypes(model32, params))


def test_denoiser_output_is_float32_close_to_float32_and_exact_on_the_skip_path():
    m32, params = _model_and_params("float32")
    m16, _ = _model_and_params("bfloat16")
    params = jax.tree.map(lambda p: p + 0.05, params)  # non-zero output layers
    d32, d16 = precond.make_denoiser(m32, 0.5), precond.make_denoiser(m16, 0.5)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
    for sigma in (0.002, 0.5, 20.0):
        s = jnp.full((4,), sigma)
        a = jax.jit(d32)(params, x * max(sigma, 1.0), s)
        b = jax.jit(d16)(params, x * max(sigma, 1.0), s)
        assert b.dtype == jnp.float32
        _, c_out, _, _ = precond.edm_coefficients(sigma, 0.5)
        # The network's bf16 error is scaled by c_out: at σ = 0.002 the skip path c_skip·x
        # (float32) dominates: the two agree far below bf16 rounding of x (~|x|·2⁻⁸ ≈ 1e-2).
        err = float(jnp.max(jnp.abs(a - b)))
        scale = float(jnp.max(jnp.abs(a - x * max(sigma, 1.0) * (0.25 / (sigma**2 + 0.25)))))
        assert err <= 0.03 * scale + 1e-6, (sigma, err, scale, float(c_out))
        if sigma == 0.002:
            assert err < 1e-3


@pytest.mark.slow  # end to end, ~25-30 s: keeps the everyday suite well under 15 min
def test_bfloat16_training_lowers_the_loss():
    # The float32 counterpart is tests/test_training.py::test_loss_falls_on_a_tiny_data_set.
    data = tiny_dataset()
    images = np.concatenate([data.images] * 8)
    mesh = devices.make_data_mesh(1)
    config = tiny_config()
    config.model.compute_dtype = "bfloat16"
    exp = experiment(config, mesh)
    before = eval_loss(exp, exp.init_state().params, images)
    exp, state = run_steps(config, mesh, 60, data)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.ema_params)} == {jnp.dtype(jnp.float32)}
    after = eval_loss(exp, state.params, images)
    assert after < 0.7 * before, (before, after)


def test_unknown_compute_dtype_is_refused():
    c = tiny_config()
    c.model.compute_dtype = "float16"
    with pytest.raises(ValueError, match="compute_dtype"):
        validate_config(c)
