"""Core throughput figures on whatever devices exist (prints a table; not a test).

    python benchmarks/bench_core.py --config configs/mnist_edm.py [--config.key=value ...]

Reports: devices and versions; compile time of the train step and the sampler; training
images/s; sampler image-evaluations/s (images × denoiser evaluations per second) and its cost
against the same number of bare network evaluations; achieved FLOP/s of the train step (XLA's
cost analysis) as a fraction of a float32 matmul peak measured in the same run; peak memory.
"""

from __future__ import annotations

import os
import resource
import sys
import time

# Config files import their base as `configs.default`: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/mnist_edm.py", "Config file.")
flags.DEFINE_integer("steps", 10, "Timed train dispatches.")
flags.DEFINE_integer("sample_batch", 0, "Sampler batch (0: the training batch).")
flags.DEFINE_integer("num_devices", 0, "Mesh size (0: all devices).")


def seconds_per_call(fn, repeats: int) -> float:
    """Seconds per call after one warm-up call."""
    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats


def matmul_peak_flops(mesh, n: int = 2048) -> float:
    """Float32 FLOP/s of one n×n matmul per device, run at once on every device of ``mesh``
    (on a CPU the host devices share the cores, so this is the whole machine's peak)."""
    from sfbd_jax.utils import devices

    k = mesh.devices.size
    a = jax.device_put(jnp.ones((k, n, n), jnp.float32), devices.batch_sharding(mesh))
    f = jax.jit(lambda a: a @ a)
    return 2 * k * n**3 / seconds_per_call(lambda: f(a), 5)


def peak_memory_bytes() -> tuple[str, float]:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return "device 0 peak", float(stats["peak_bytes_in_use"])
    return "host max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def main(argv):
    del argv
    from sfbd_jax.utils import devices

    config = FLAGS.config
    devices.configure_cpu_devices(config.num_cpu_devices)
    from sfbd_jax.data import pipeline, sources
    from sfbd_jax.diffusion import sampler as sampler_lib
    from sfbd_jax.training.loop import Experiment

    mesh = devices.make_data_mesh(FLAGS.num_devices or None)
    exp = Experiment(config, mesh)
    rows = [("jax / flax", f"{jax.__version__} / {__import__('flax').__version__}"),
            ("devices", f"{mesh.devices.size} × {jax.devices()[0].device_kind}"),
            ("python", sys.version.split()[0])]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state().params))
    rows.append(("parameters", f"{n_params / 1e6:.2f} M"))

    dataset = sources.load_source(config.data)
    batches = pipeline.TrainBatches(dataset, config.train.batch_size,
                                    config.train.steps_per_dispatch, config.seed, mesh,
                                    config.model.num_classes)
    state = exp.init_state()
    batch = batches.get(0)
    t = time.perf_counter()
    compiled = exp.train_step.lower(state, batch).compile()
    rows.append(("train step compile", f"{time.perf_counter() - t:.1f} s"))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts the FLOPs of one partition of the SPMD program: scale to the whole mesh.
    flops = (float(cost.get("flops", float("nan"))) if cost else float("nan")) * mesh.devices.size

    holder = {"state": state}

    def one_dispatch():
        holder["state"], metrics = exp.train_step(holder["state"], batch)
        return metrics

    sec = seconds_per_call(one_dispatch, FLAGS.steps)
    imgs = config.train.batch_size * config.train.steps_per_dispatch
    rows.append(("train images/s", f"{imgs / sec:.1f}"))
    peak = matmul_peak_flops(mesh)
    rows.append(("train step FLOP/s (XLA count)", f"{flops / sec / 1e9:.2f} GFLOP/s "
                 f"= {flops / sec / peak:.1%} of the matmul peak {peak / 1e9:.1f} GFLOP/s"))

    b = FLAGS.sample_batch or config.train.batch_size
    cfg = config.sampler
    sigmas = sampler_lib.karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    nfe = sampler_lib.num_evaluations(sigmas)
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (b, *exp.image_shape)) * 80.0,
                       devices.batch_sharding(mesh))
    sample = exp.sampler(sigmas)
    params = holder["state"].ema_params
    key = jax.random.PRNGKey(1)
    t = time.perf_counter()
    sample.lower(params, x, None, key).compile()
    rows.append(("sampler compile", f"{time.perf_counter() - t:.1f} s"))
    sec_sample = seconds_per_call(lambda: sample(params, x, None, key), 2)
    rows.append(("sampler image-evaluations/s", f"{b * nfe / sec_sample:.1f} "
                 f"({nfe} evaluations per image, batch {b})"))
    bare = jax.jit(lambda p, x: exp.denoise(p, x, jnp.ones((x.shape[0],))),
                   in_shardings=(devices.replicated(mesh), devices.batch_sharding(mesh)))
    sec_bare = seconds_per_call(lambda: bare(params, x), 5)
    rows.append(("sampler / bare evaluations", f"{sec_sample / (nfe * sec_bare):.3f}× the cost "
                 f"of {nfe} bare denoiser calls"))
    label, mem = peak_memory_bytes()
    rows.append((label, f"{mem / 2**20:.0f} MiB"))

    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    app.run(main)
