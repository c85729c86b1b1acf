"""Train step, optimiser, EMA and data parallelism on a tiny U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from sfbd_jax.data import pipeline
from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.diffusion import edm
from sfbd_jax.training import ema, optim
from sfbd_jax.training.loop import Experiment
from sfbd_jax.utils import devices


def tiny_dataset(n: int = 32, size: int = 8) -> ImageDataset:
    """Smooth random images in [-1, 1]: upsampled 2×2 patterns."""
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(n, size // 4, size // 4, 1))
    images = np.tanh(np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)).astype(np.float32)
    return ImageDataset(images, np.arange(n, dtype=np.int32) % 2, 2, "tiny")


def experiment(config, mesh):
    """An Experiment; those of an equal config and mesh share their compiled programs."""
    return Experiment(config, mesh)


def run_steps(config, mesh, num_steps, dataset=None):
    exp = experiment(config, mesh)
    state = exp.init_state()
    batches = pipeline.TrainBatches(dataset or tiny_dataset(), config.train.batch_size,
                                    config.train.steps_per_dispatch, config.seed, mesh, 0)
    k = config.train.steps_per_dispatch
    for s in range(0, num_steps, k):
        state, _ = exp.train_step(state, batches.get(s))
    return exp, state


def eval_loss(exp, params, images):
    per_ex = edm.edm_loss_per_example(exp.denoise, params, jnp.asarray(images),
                                      jax.random.PRNGKey(123), sigma_data=0.5, p_mean=-1.2,
                                      p_std=1.2, train=False)
    return float(per_ex.mean())


def test_loss_falls_on_a_tiny_data_set():
    config = tiny_config()
    data = tiny_dataset()
    images = np.concatenate([data.images] * 8)  # many σ draws per image for a stable estimate
    exp = experiment(config, devices.make_data_mesh(1))
    before = eval_loss(exp, exp.init_state().params, images)
    exp, state = run_steps(config, devices.make_data_mesh(1), 60, data)
    after = eval_loss(exp, state.params, images)
    assert after < 0.7 * before, (before, after)


def test_one_and_two_devices_give_the_same_parameters(two_devices):
    config = tiny_config()
    _, s1 = run_steps(config, devices.make_data_mesh(1), 3)
    _, s2 = run_steps(config, devices.make_data_mesh(2), 3)
    assert int(s1.step) == int(s2.step) == 3
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unroll", [True, False])
def test_several_steps_per_dispatch_match_single_steps(unroll):
    config = tiny_config()
    _, s1 = run_steps(config, devices.make_data_mesh(1), 2)
    config.train.steps_per_dispatch = 2
    config.train.unroll_dispatch = unroll
    _, s2 = run_steps(config, devices.make_data_mesh(1), 2)
    assert int(s2.step) == 2 and int(s2.images_seen) == 16
    for a, b in zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(s2.ema_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_ema_decay_values():
    # First update: images_seen = 0 → half-life 0 → β = 0 (EMA = parameters).
    assert float(ema.ema_decay(0, 10, 500.0, 0.05)) == 0.0
    # Ramp-up: half-life min(500, 0.05·1000) = 50 images → β = 0.5^(10/50).
    assert float(ema.ema_decay(1000, 10, 500.0, 0.05)) == pytest.approx(0.5 ** 0.2)
    # Past the ramp: β = 0.5^(10/500).
    assert float(ema.ema_decay(10**6, 10, 500.0, 0.05)) == pytest.approx(0.5 ** 0.02)
    assert float(ema.ema_decay(0, 10, 500.0, 0.0)) == pytest.approx(0.5 ** 0.02)
    new = ema.ema_update({"w": jnp.array(1.0)}, {"w": jnp.array(3.0)}, jnp.array(0.75))
    assert float(new["w"]) == pytest.approx(0.75 * 1.0 + 0.25 * 3.0)


def test_ema_after_first_step_equals_parameters():
    _, state = run_steps(tiny_config(), devices.make_data_mesh(1), 1)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_warmup_schedule_values():
    sched = optim.warmup_schedule(1e-3, warmup_images=100, batch_size=10)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 4, 9, 20)],
                               [1e-4, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    assert float(optim.warmup_schedule(1e-3, 0, 10)(0)) == pytest.approx(1e-3)


def test_inverse_sqrt_decay_values():
    """EDM2's decay: lr·min(n/warmup, 1)/sqrt(max(n/decay, 1)), n = images after the step."""
    config = tiny_config()
    config.optim.lr, config.optim.warmup_images, config.optim.decay_images = 1e-3, 100, 400
    sched = optim.lr_schedule(config.optim, batch_size=10)
    steps = (0, 9, 39, 159, 399)  # 10, 100, 400, 1,600 and 4,000 images
    np.testing.assert_allclose([float(sched(s)) for s in steps],
                               [1e-4, 1e-3, 1e-3, 5e-4, 1e-3 / np.sqrt(10)], rtol=1e-6)
    config.optim.decay_images = 0  # off: the warm-up alone
    constant = optim.lr_schedule(config.optim, batch_size=10)
    np.testing.assert_allclose(float(constant(399)), 1e-3, rtol=1e-6)


def test_decay_is_applied_by_the_optimizer():
    """At step 2,000 of 8 images with decay_images = 4,000 the update is half the undecayed
    optimiser's (the same Adam state: its step counter moved on, as after 1,999 steps)."""
    config = tiny_config()
    config.optim.warmup_images = 0
    params, grads = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    moves = []
    for decay_images in (4_000, 0):
        config.optim.decay_images = decay_images
        opt = optim.make_optimizer(config.optim, 8)
        state = jax.tree.map(lambda x: jnp.full_like(x, 1_999) if x.dtype == jnp.int32 else x,
                             opt.init(params))
        updates, _ = opt.update(grads, state, params)
        moves.append(np.asarray(updates["w"]))
    assert np.all(moves[1] < 0)
    np.testing.assert_allclose(moves[0], 0.5 * moves[1], rtol=1e-5)


def test_warmup_is_applied_by_the_optimizer():
    config = tiny_config()
    config.optim.warmup_images = 80  # 10 steps of 8
    opt = optim.make_optimizer(config.optim, 8)
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    grads = {"w": jnp.ones(3)}
    updates, state = opt.update(grads, state, params)
    # Adam's first step moves by lr·sign(g) = 0.1·lr here.
    np.testing.assert_allclose(updates["w"], -0.1 * config.optim.lr, rtol=1e-4)


def test_nonfinite_gradients_are_zeroed_and_counted():
    grads = {"a": jnp.array([1.0, jnp.nan, jnp.inf]), "b": jnp.array([-jnp.inf, 2.0])}
    clean, count = optim.zero_nonfinite(grads)
    assert int(count) == 3
    np.testing.assert_array_equal(clean["a"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(clean["b"], [0.0, 2.0])


def test_gradient_clipping_is_in_the_chain():
    """With clipping, a huge first gradient no longer dominates Adam's moments."""
    config = tiny_config()
    config.optim.warmup_images = 0
    params = {"w": jnp.zeros(1)}
    steps = []
    for clip in (0.0, 1.0):
        config.optim.grad_clip = clip
        opt = optim.make_optimizer(config.optim, 8)
        state = opt.init(params)
        _, state = opt.update({"w": jnp.array([1000.0])}, state, params)
        updates, _ = opt.update({"w": jnp.array([-1.0])}, state, params)
        steps.append(float(updates["w"][0]))
    # Unclipped, the momentum of the +1000 gradient still points the second step down;
    # clipped to norm 1, the −1 gradient outweighs it and the step goes up.
    assert steps[0] < 0 < steps[1]
    clip = optax.clip_by_global_norm(1.0)
    g, _ = clip.update({"w": jnp.array([30.0, 40.0])}, clip.init(None))
    assert float(optax.global_norm(g)) == pytest.approx(1.0)


def test_init_state_compiled_without_optimisation_is_bit_identical():
    """init_state compiles at XLA optimisation level 0 (faster set-up); the parameters must be
    exactly those of an optimised compile of the same initialisation."""
    config = tiny_config()
    exp = experiment(config, devices.make_data_mesh(1))
    fast = exp.init_state()
    optimised = jax.jit(exp.programs.init)(exp.base_key)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(optimised), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_experiments_of_an_equal_config_share_their_programs():
    """A resumed run, SFBD's rounds and repeated runs build Experiments of equal configs: they
    share one set of programs (traced once), while any changed value gets its own; changing a
    config after its Experiment was built does not reach the programs built from it."""
    mesh = devices.make_data_mesh(1)
    config = tiny_config()
    first = Experiment(config, mesh)
    again = Experiment(tiny_config(), mesh)
    assert again.programs is first.programs and again.train_step is first.train_step
    assert again.abstract_state() is first.abstract_state()
    assert first.sampler([1.0, 0.5, 0.0]) is again.sampler([1.0, 0.5, 0.0])
    assert first.sampler([1.0, 0.5, 0.0]) is not first.sampler([2.0, 0.5, 0.0])

    # Two runs of the same config: the train step is traced (and compiled) once.
    batches = pipeline.TrainBatches(tiny_dataset(), config.train.batch_size, 1, 0, mesh, 0)
    first.train_step(first.init_state(), batches.get(0))
    traced = first.train_step._cache_size()
    again.train_step(again.init_state(), batches.get(0))
    assert again.train_step._cache_size() == traced

    # Keys that change no program (budget, cadences, seed, data source) share them too.
    longer = tiny_config()
    longer.train.total_images, longer.train.checkpoint_every_steps, longer.seed = 640, 2, 5
    longer.data.source = "folder"
    assert Experiment(longer, mesh).programs is first.programs

    changed = tiny_config()
    changed.diffusion.sigma_data = 0.25
    other = Experiment(changed, mesh)
    assert other.programs is not first.programs
    assert Experiment(config, devices.make_data_mesh(2)).programs is not first.programs
    # The programs hold a frozen copy: mutating the caller's config changes nothing in them,
    # and an Experiment of the mutated config gets programs of the new values.
    config.diffusion.sigma_data = 0.25
    assert Experiment(config, mesh).programs is other.programs
    assert Experiment(tiny_config(), mesh).programs is first.programs
