"""One full SFBD backward round (denoise every noisy image from σ_ζ), timed, at several sizes
of the noisy set; each size in a fresh process so that its peak memory is its own.
``--config.sfbd.backward=dps`` times EMDiffusion's E-step instead.

    python benchmarks/bench_backward.py --config configs/demo.py --sizes 1024,4096
    python benchmarks/bench_backward.py --config configs/sfbd_smoke.py --sizes 4096,16384,65536

The noisy set is synthetic (random images + σ_ζ noise, written as .npy shards and read
memory-mapped, as SFBD reads the prepared data); the network is the config's, freshly
initialised (the cost of denoising does not depend on the weights). Reports images/s, denoiser
evaluations per image, compile time, and the process's peak memory (host max RSS; device peak
on a GPU): the backward round streams shard by shard, so the peak must not grow with the set.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def _peak_memory_mib() -> tuple[str, float]:
    import jax

    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return "device 0 peak", stats["peak_bytes_in_use"] / 2**20
    return "host max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_noisy_set(directory: str, num: int, shape: tuple, shard_size: int, sigma: float,
                    seed: int = 0) -> list[dict]:
    """``num`` synthetic noisy images as shards of ``shard_size`` rows (one in memory at a
    time)."""
    import numpy as np

    from sfbd_jax.data import shards

    rng = np.random.default_rng(seed)
    entries = []
    for start in range(0, num, shard_size):
        rows = min(shard_size, num - start)
        x = rng.uniform(-1, 1, (rows, *shape)) + sigma * rng.normal(size=(rows, *shape))
        entries.append(shards.write_shard(directory, f"noisy-{start:09d}.npy",
                                          x.astype(np.float32)))
    return entries


def child(config, size: int, num_devices: int) -> dict:
    """Run one backward round on ``size`` noisy images; return its figures."""
    import jax

    from sfbd_jax.utils import devices

    devices.configure_cpu_devices(config.num_cpu_devices)
    from sfbd_jax.data import shards
    from sfbd_jax.methods import backward
    from sfbd_jax.training.loop import Experiment

    mesh = devices.make_data_mesh(num_devices or None)
    exp = Experiment(config, mesh)
    state = exp.init_state()
    cfg = config.sfbd
    sigma = config.corrupt.sigma
    # The backward step the config selects (sfbd.backward: SFBD's ODE or EMDiffusion's DPS).
    sampler = backward.make_backward_sampler(exp.denoise, mesh, config, sigma)
    sample = sampler.sample
    with tempfile.TemporaryDirectory() as tmp:
        entries = write_noisy_set(os.path.join(tmp, "noisy"), size, exp.image_shape,
                                  config.corrupt.shard_size, sigma)
        noisy = shards.ShardedArray(os.path.join(tmp, "noisy"), entries, verify=False)
        key = jax.random.PRNGKey(0)
        b = cfg.denoise_batch_size
        x = jax.device_put(jax.numpy.zeros((b, *exp.image_shape)), devices.batch_sharding(mesh))
        t = time.perf_counter()
        jax.block_until_ready(sample(state.ema_params, x, None, key))  # compile
        compile_s = time.perf_counter() - t
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        backward.denoise_set(sample, state.ema_params, noisy, os.path.join(tmp, "denoised"),
                             mesh=mesh, batch_size=b, shard_size=cfg.denoise_shard_size,
                             key=key, settings={"benchmark": size})
        seconds = time.perf_counter() - t
    label, peak = _peak_memory_mib()
    return {"size": size, "seconds": seconds, "images_per_s": size / seconds,
            "evaluations_per_image": sampler.evaluations_per_image,
            "gradients_per_image": sampler.gradients_per_image,
            "compile_s": compile_s, "memory": label, "peak_mib": peak,
            "host_peak_before_round_mib": rss_before,
            "devices": f"{mesh.devices.size} × {jax.devices()[0].device_kind}",
            "batch": b, "image_shape": list(exp.image_shape), "jax": jax.__version__}


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (+ --config.k=v).")
flags.DEFINE_string("sizes", "1024,4096", "Noisy-set sizes, comma-separated.")
flags.DEFINE_integer("num_devices", 0, "Mesh size (0: all devices).")
flags.DEFINE_integer("child", 0, "Internal: run one size in this process.")


def main(argv) -> None:
    del argv
    if FLAGS.child:
        print("RESULT " + json.dumps(child(FLAGS.config, FLAGS.child, FLAGS.num_devices)))
        return
    config_path = FLAGS["config"].config_filename
    results = []
    for size in [int(s) for s in FLAGS.sizes.split(",")]:
        # The same command line (config overrides included) for one size in a fresh process.
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--child={size}"]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            raise RuntimeError(f"size {size} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    first = results[0]
    print(f"config {config_path}: {first['devices']}, jax {first['jax']}, images "
          f"{tuple(first['image_shape'])}, batch {first['batch']}, "
          f"{first['evaluations_per_image']} evaluations per image "
          f"({first['gradients_per_image']} of them differentiated), "
          f"compile {first['compile_s']:.1f} s")
    print(f"{'noisy images':>12}  {'seconds':>8}  {'images/s':>9}  {'image-evals/s':>13}  "
          f"{first['memory'] + ' (MiB)':>22}")
    for r in results:
        print(f"{r['size']:>12}  {r['seconds']:>8.1f}  {r['images_per_s']:>9.1f}  "
              f"{r['images_per_s'] * r['evaluations_per_image']:>13.1f}  {r['peak_mib']:>22.0f}")
    growth = results[-1]["peak_mib"] - results[0]["peak_mib"]
    data_growth = (results[-1]["size"] - results[0]["size"]) * 4 * \
        int(__import__("numpy").prod(first["image_shape"])) / 2**20
    print(f"peak memory change from {results[0]['size']} to {results[-1]['size']} images: "
          f"{growth:+.0f} MiB (holding the whole denoised set would add {data_growth:.0f} MiB)")


if __name__ == "__main__":
    app.run(main)
