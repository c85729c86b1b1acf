"""sfbd_jax against the PyTorch reference (watml/SFBD, an NVlabs/edm fork) on the same network,
side by side: training step time, set-up + compile, sampler time, peak host memory.

    # once: a checkout of the reference (never committed) and a CPU torch in a scratch venv
    python -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy requests
    git clone <watml/SFBD> /tmp/sfbd_ref          # or any export of that repository
    python benchmarks/vs_pytorch.py --reference /tmp/sfbd_ref \
        --torch_python /tmp/torchvenv/bin/python

Network "config A": EDM's DDPM++ SongUNet, 64 channels, channel_mult (1, 2, 2), 2 blocks per
level, attention at 16×16 with one head, 32×32×3, positional noise embedding, dropout 0.1 —
6,989,891 parameters on both sides (checked). Loss: EDM's (P_mean −1.2, P_std 1.2), Adam.

For every batch size the driver starts one fresh long-lived worker per side (so each side's
peak memory is its own), sets both up (timed: imports + network + first step, i.e. JAX's
compilation), warms up, then alternates timed blocks A B A B (``--pairs``) of ``--steps``
training steps each, so both sides see the same machine load. Then each side runs the Heun
probability-flow sampler (18 levels = 35 network evaluations) on ``--sample_batch`` images,
timed after one warm-up, and reports its peak RSS. Prints a markdown table and writes
OUT/vs_pytorch.json.

The workers: ``--worker jax`` (this file, sfbd_jax's Experiment, ``--num_devices`` host
devices) and ``benchmarks/torch_worker.py`` (run by ``--torch_python``; imports the reference's
``training.networks`` from ``--reference``). They talk JSON lines over stdin/stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CONFIG_A = dict(base_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16,),
                num_heads=1, dropout=0.1, embedding_type="positional", image_size=32,
                channels=3)
EXPECTED_PARAMS = 6_989_891


# ----- the JAX worker ----------------------------------------------------------------------
def config_a_experiment(batch: int, num_devices: int, overrides: dict | None = None):
    """(Experiment, initial state, TrainBatches) for config A at global ``batch`` over the first
    ``num_devices`` devices, Adam without gradient clipping (as the reference's loop), random
    images in [-1, 1]. ``overrides``: extra ``section.key`` -> value (strings parsed as the
    config's type), for profiling variants. Call after ``devices.configure_cpu_devices``."""
    import numpy as np

    from configs import default
    from sfbd_jax.data import pipeline
    from sfbd_jax.data.sources import ImageDataset
    from sfbd_jax.training.loop import Experiment
    from sfbd_jax.utils import devices

    c = default.get_config()
    for key in ("base_channels", "channel_mult", "num_blocks", "attn_resolutions", "num_heads",
                "dropout", "embedding_type"):
        c.model[key] = CONFIG_A[key]
    c.data.image_size, c.data.channels = CONFIG_A["image_size"], CONFIG_A["channels"]
    c.train.batch_size = batch
    c.optim.grad_clip = 0.0
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        old = c[section][key]
        c[section][key] = type(old)(value) if not isinstance(old, bool) else value == "True"
    exp = Experiment(c, devices.make_data_mesh(num_devices))
    images = np.random.default_rng(0).uniform(-1, 1, (4 * batch, 32, 32, 3))
    data = ImageDataset(images.astype(np.float32), None, 0, "random")
    batches = pipeline.TrainBatches(data, batch, 1, 0, exp.mesh, 0)
    return exp, exp.init_state(), batches


def _jax_worker(num_devices: int) -> None:
    t0 = time.perf_counter()
    from sfbd_jax.utils import devices

    devices.configure_cpu_devices(num_devices)
    import jax

    from sfbd_jax.diffusion import sampler as sampler_lib

    state = exp = batches = None
    step_index = 0
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "setup":
            exp, state, batches = config_a_experiment(msg["batch"], num_devices)
            params = sum(x.size for x in jax.tree.leaves(state.params))
            state, metrics = exp.train_step(state, batches.get(0))  # compiles
            jax.block_until_ready(metrics["loss"])
            reply = {"params": int(params), "setup_seconds": time.perf_counter() - t0,
                     "versions": f"jax {jax.__version__}, flax "
                                 f"{__import__('flax').__version__}, {num_devices} host "
                                 "device(s)"}
        elif msg["cmd"] == "train":
            times = []
            for _ in range(msg["steps"]):
                step_index += 1
                batch = batches.get(step_index % 4)
                t = time.perf_counter()
                state, metrics = exp.train_step(state, batch)
                jax.block_until_ready(metrics["loss"])
                times.append(time.perf_counter() - t)
            reply = {"seconds": times, "loss": float(metrics["loss"])}
        elif msg["cmd"] == "sample":
            sigmas = sampler_lib.karras_sigmas(msg["levels"], 0.002, 80.0, 7.0)
            sample = exp.sampler(sigmas)
            n = msg["n"]
            x = jax.random.normal(jax.random.PRNGKey(1), (n, 32, 32, 3)) * sigmas[0]
            x = jax.device_put(x, devices.batch_sharding(exp.mesh))
            out = sample(state.ema_params, x, None, jax.random.PRNGKey(2))  # compiles
            jax.block_until_ready(out)
            t = time.perf_counter()
            jax.block_until_ready(sample(state.ema_params, x, None, jax.random.PRNGKey(3)))
            reply = {"seconds": time.perf_counter() - t}
        elif msg["cmd"] == "memory":
            reply = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        else:
            return
        print(json.dumps(reply), flush=True)


# ----- the driver --------------------------------------------------------------------------
class Worker:
    def __init__(self, argv: list[str], threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[:2]} died (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def compare(args, batch: int) -> dict:
    jax_side = Worker([sys.executable, os.path.abspath(__file__), "--worker", "jax",
                       "--num_devices", str(args.num_devices)], args.threads)
    torch_side = Worker([args.torch_python, os.path.join(HERE, "torch_worker.py"),
                         "--reference", args.reference, "--threads", str(args.threads)],
                        args.threads)
    try:
        row = {"batch": batch}
        for name, w in (("jax", jax_side), ("torch", torch_side)):
            row[name] = w.ask(cmd="setup", batch=batch)
            if row[name]["params"] != EXPECTED_PARAMS:
                raise RuntimeError(f"{name} network has {row[name]['params']} parameters, "
                                   f"expected {EXPECTED_PARAMS}: not config A")
        for w in (jax_side, torch_side):
            w.ask(cmd="train", steps=args.warmup)
        blocks = {"jax": [], "torch": []}
        for _ in range(args.pairs):
            for name, w in (("jax", jax_side), ("torch", torch_side)):
                blocks[name].append(w.ask(cmd="train", steps=args.steps)["seconds"])
        for name, w in (("jax", jax_side), ("torch", torch_side)):
            steps = [s for block in blocks[name] for s in block]
            row[name].update(
                step_blocks=[sum(b) / len(b) for b in blocks[name]], step_median=_median(steps),
                step_min=min(steps), step_max=max(steps),
                sample_seconds=w.ask(cmd="sample", n=args.sample_batch, levels=18)["seconds"],
                max_rss_bytes=w.ask(cmd="memory")["max_rss_bytes"])
        return row
    finally:
        jax_side.close()
        torch_side.close()


def table(rows: list[dict], load: str) -> str:
    lines = [f"| figure ({load}) | sfbd_jax | PyTorch reference | sfbd_jax / PyTorch |",
             "|---|---|---|---|"]
    for r in rows:
        j, t, b = r["jax"], r["torch"], r["batch"]
        fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        lines += [
            f"| train step, batch {b}: mean s of each block (A B alternated) | "
            f"{fmt(j['step_blocks'])} | {fmt(t['step_blocks'])} | "
            f"{j['step_median'] / t['step_median']:.2f}× the time (medians) |",
            f"| train images/s, batch {b} (median step) | {b / j['step_median']:.1f} | "
            f"{b / t['step_median']:.1f} | {t['step_median'] / j['step_median']:.2f}× the speed |",
            f"| step min–max, batch {b} | {j['step_min']:.2f}–{j['step_max']:.2f} s | "
            f"{t['step_min']:.2f}–{t['step_max']:.2f} s | |",
            f"| set-up + first step (compile), batch {b} | {j['setup_seconds']:.1f} s | "
            f"{t['setup_seconds']:.1f} s | |",
            f"| Heun sampler, 35 evaluations, {r['sample_batch']} images | "
            f"{j['sample_seconds']:.2f} s | {t['sample_seconds']:.2f} s | "
            f"{j['sample_seconds'] / t['sample_seconds']:.2f}× the time |",
            f"| peak host memory (max RSS), batch {b} | {j['max_rss_bytes'] / 2**30:.2f} GiB | "
            f"{t['max_rss_bytes'] / 2**30:.2f} GiB | "
            f"{j['max_rss_bytes'] / t['max_rss_bytes']:.2f}× |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=("jax",), help=argparse.SUPPRESS)
    parser.add_argument("--reference", help="a checkout of watml/SFBD (not committed)")
    parser.add_argument("--torch_python", help="a Python with torch (a scratch venv)")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed block")
    parser.add_argument("--pairs", type=int, default=3, help="alternated A B blocks")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample_batch", type=int, default=64)
    parser.add_argument("--num_devices", type=int, default=2, help="JAX host devices")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", default="runs/vs_pytorch")
    args = parser.parse_args(argv)
    if args.worker == "jax":
        _jax_worker(args.num_devices)
        return []
    if not (args.reference and args.torch_python):
        parser.error("--reference and --torch_python are required")
    os.makedirs(args.out, exist_ok=True)
    load = f"load average {os.getloadavg()[0]:.1f} at the start"
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        row = compare(args, batch)
        row["sample_batch"] = args.sample_batch
        rows.append(row)
        print(f"batch {batch}: jax {row['jax']['step_median']:.2f} s/step, torch "
              f"{row['torch']['step_median']:.2f} s/step", flush=True)
    text = table(rows, load)
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "versions": {"jax": rows[0]["jax"]["versions"],
                         "torch": rows[0]["torch"]["versions"]}, "load": load,
            "args": vars(args), "rows": rows}
    with open(os.path.join(args.out, "vs_pytorch.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(text)
    print(json.dumps({k: info[k] for k in ("machine", "versions", "load")}))
    return rows


if __name__ == "__main__":
    main()
