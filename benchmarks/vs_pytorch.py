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
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tables  # noqa: E402  (this folder's helpers: the script's folder is on sys.path)

CONFIG_A = dict(base_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16,),
                num_heads=1, dropout=0.1, embedding_type="positional", image_size=32,
                channels=3)
EXPECTED_PARAMS = {"config_a": 6_989_891, "ddpmpp_cifar10": 55_732_739}
# The reference's EDMPrecond(SongUNet) arguments for each network (EDM's train.py choices).
TORCH_NETWORKS = {
    "config_a": dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=2,
                     attn_resolutions=[16], dropout=0.1),
    "ddpmpp_cifar10": dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                           attn_resolutions=[16], dropout=0.13),
}
# Precision of a row: sfbd_jax's (config.model.compute_dtype, jax_default_matmul_precision)
# and, in torch_worker.py, (autocast dtype, TF32 allowed). "f32" is the reference's own setting
# (EDM's training loop turns TF32 off); "tf32" lets both sides use TF32 tensor cores for float32
# convolutions and matmuls; "bf16" is mixed precision (float32 parameters, bf16 compute).
JAX_PRECISION = {"f32": ("float32", "float32"), "tf32": ("float32", "tensorfloat32"),
                 "bf16": ("bfloat16", None)}


# ----- the JAX worker ----------------------------------------------------------------------
def config_a_experiment(batch: int, num_devices: int, overrides: dict | None = None,
                        network: str = "config_a", compute_dtype: str = "float32"):
    """(Experiment, initial state, TrainBatches) for ``network`` (config A or EDM's CIFAR-10
    DDPM++) at global ``batch`` over the first ``num_devices`` devices, Adam without gradient
    clipping (as the reference's loop), random images in [-1, 1]. ``overrides``: extra
    ``section.key`` -> value (strings parsed as the config's type), for profiling variants.
    On a CPU, call after ``devices.configure_cpu_devices``."""
    import numpy as np

    from configs import default, networks
    from sfbd_jax.data import pipeline
    from sfbd_jax.data.sources import ImageDataset
    from sfbd_jax.training.loop import Experiment
    from sfbd_jax.utils import devices

    c = default.get_config()
    if network == "config_a":
        for key in ("base_channels", "channel_mult", "num_blocks", "attn_resolutions",
                    "num_heads", "dropout", "embedding_type"):
            c.model[key] = CONFIG_A[key]
    else:
        c.model.update(getattr(networks, network)())
    c.model.compute_dtype = compute_dtype
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


def _matmul_peaks(n: int = 8192, repeats: int = 10) -> dict:
    """Measured FLOP/s of an n×n×n matmul on device 0 for each row precision (the ceiling the
    MFU figures are taken against); explicit precisions, whatever the worker's default."""
    import jax
    import jax.numpy as jnp
    from bench_core import seconds_per_call

    peaks = {}
    for name, dtype, precision in (("bf16", jnp.bfloat16, jax.lax.Precision.DEFAULT),
                                   ("tf32", jnp.float32, jax.lax.Precision.DEFAULT),
                                   ("f32", jnp.float32, jax.lax.Precision.HIGHEST)):
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
        f = jax.jit(lambda a, p=precision: jnp.matmul(a, a, precision=p))
        peaks[name] = 2 * n**3 / seconds_per_call(lambda f=f, a=a: f(a), repeats)
    return peaks


def _progress(t0: float, what: str) -> None:
    """A worker's stage and its seconds since start, on stderr (kept with --worker_logs)."""
    print(f"[{time.perf_counter() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)


def _jax_worker(num_devices: int, device: str, network: str, precision: str) -> None:
    t0 = time.perf_counter()
    from sfbd_jax.utils import devices

    if device == "cpu":
        devices.configure_cpu_devices(num_devices)
    import jax

    compute_dtype, matmul_precision = JAX_PRECISION[precision]
    if matmul_precision:
        jax.config.update("jax_default_matmul_precision", matmul_precision)
    from sfbd_jax.diffusion import sampler as sampler_lib

    state = exp = batches = step = None
    step_index = 0
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "setup":
            exp, state, batches = config_a_experiment(msg["batch"], num_devices,
                                                      network=network,
                                                      compute_dtype=compute_dtype)
            params = sum(x.size for x in jax.tree.leaves(state.params))
            _progress(t0, "network built and initialised")
            step = exp.train_step.lower(state, batches.get(0)).compile()
            _progress(t0, "train step compiled")
            cost = step.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            state, metrics = step(state, batches.get(0))
            jax.block_until_ready(metrics["loss"])
            _progress(t0, "first step done")
            reply = {"params": int(params), "setup_seconds": time.perf_counter() - t0,
                     # XLA counts one partition of the SPMD program: scale to the mesh.
                     "step_flops": float((cost or {}).get("flops", float("nan")))
                     * exp.mesh.devices.size,
                     "versions": f"jax {jax.__version__}, flax "
                                 f"{__import__('flax').__version__}, {exp.mesh.devices.size} "
                                 f"× {jax.devices()[0].device_kind}"}
        elif msg["cmd"] == "train":
            times = []
            for _ in range(msg["steps"]):
                step_index += 1
                batch = batches.get(step_index % 4)
                t = time.perf_counter()
                state, metrics = step(state, batch)
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
            _progress(t0, "sampler compiled")
            t = time.perf_counter()
            jax.block_until_ready(sample(state.ema_params, x, None, jax.random.PRNGKey(3)))
            reply = {"seconds": time.perf_counter() - t}
        elif msg["cmd"] == "memory":
            from bench_core import peak_memory_bytes

            kind, peak = peak_memory_bytes()
            reply = {"memory_kind": kind, "peak_bytes": int(peak)}
        elif msg["cmd"] == "peaks":
            reply = {"peaks": _matmul_peaks()}
        else:
            return
        print(json.dumps(reply), flush=True)


# ----- the driver --------------------------------------------------------------------------
class Worker:
    def __init__(self, argv: list[str], threads: int, log_path: str | None = None):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="3",
                   XLA_PYTHON_CLIENT_PREALLOCATE="false")  # two processes share one GPU
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)

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
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def compare(args, batch: int, precision: str) -> dict:
    """One row: both workers set up at ``batch`` and ``precision``, timed side by side."""
    tag = f"{args.network}_b{batch}_{precision}"

    def log(side: str) -> str | None:
        return os.path.join(args.out, f"{tag}_{side}.log") if args.worker_logs else None

    jax_side = Worker([sys.executable, os.path.abspath(__file__), "--worker", "jax",
                       "--num_devices", str(args.num_devices), "--device", args.device,
                       "--network", args.network, "--precisions", precision],
                      args.threads, log("jax"))
    torch_side = Worker([args.torch_python, os.path.join(HERE, "torch_worker.py"),
                         "--reference", args.reference, "--threads", str(args.threads),
                         "--device", "cuda" if args.device == "gpu" else "cpu",
                         "--precision", precision], args.threads, log("torch"))
    try:
        row = {"batch": batch, "precision": precision, "network": args.network}
        row["jax"] = jax_side.ask(cmd="setup", batch=batch)
        row["torch"] = torch_side.ask(cmd="setup", batch=batch,
                                      network=TORCH_NETWORKS[args.network])
        expected = EXPECTED_PARAMS[args.network]
        for name in ("jax", "torch"):
            if row[name]["params"] != expected:
                raise RuntimeError(f"{name} network has {row[name]['params']} parameters, "
                                   f"expected {expected}: not {args.network}")
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
                **w.ask(cmd="memory"))
        if args.device == "gpu":
            row["peaks"] = jax_side.ask(cmd="peaks")["peaks"]
        return row
    finally:
        jax_side.close()
        torch_side.close()


def table(rows: list[dict], load: str) -> str:
    lines = [f"| figure ({load}) | sfbd_jax | PyTorch reference | sfbd_jax / PyTorch |",
             "|---|---|---|---|"]
    for r in rows:
        j, t, b = r["jax"], r["torch"], r["batch"]
        at = f"batch {b}, {r['precision']}"
        fmt = lambda xs: " / ".join(f"{x:.3g}" for x in xs)  # noqa: E731
        lines += [
            f"| train step, {at}: mean s of each block (A B alternated) | "
            f"{fmt(j['step_blocks'])} | {fmt(t['step_blocks'])} | "
            f"{j['step_median'] / t['step_median']:.2f}× the time (medians) |",
            f"| train images/s, {at} (median step) | {b / j['step_median']:.1f} | "
            f"{b / t['step_median']:.1f} | {t['step_median'] / j['step_median']:.2f}× the speed |",
            f"| step min–max, {at} | {j['step_min']:.3g}–{j['step_max']:.3g} s | "
            f"{t['step_min']:.3g}–{t['step_max']:.3g} s | |",
        ]
        if "peaks" in r:
            peak = r["peaks"][r["precision"]]
            flops = j["step_flops"]
            lines.append(
                f"| MFU, {at} (XLA's {flops / 1e12:.2f} TFLOP per step ÷ step time ÷ the "
                f"measured {r['precision']} matmul peak {peak / 1e12:.0f} TFLOP/s) | "
                f"{flops / j['step_median'] / peak:.1%} | "
                f"{flops / t['step_median'] / peak:.1%} | |")
        lines += [
            f"| set-up + first step (compile), {at} | {j['setup_seconds']:.1f} s | "
            f"{t['setup_seconds']:.1f} s | |",
            f"| Heun sampler, 35 evaluations, {r['sample_batch']} images, {r['precision']} | "
            f"{j['sample_seconds']:.3g} s | {t['sample_seconds']:.3g} s | "
            f"{j['sample_seconds'] / t['sample_seconds']:.2f}× the time |",
            f"| peak memory ({j['memory_kind']}), {at} | {j['peak_bytes'] / 2**30:.2f} GiB | "
            f"{t['peak_bytes'] / 2**30:.2f} GiB | {j['peak_bytes'] / t['peak_bytes']:.2f}× |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=("jax",), help=argparse.SUPPRESS)
    parser.add_argument("--reference", help="a checkout of watml/SFBD (not committed)")
    parser.add_argument("--torch_python", help="a Python with torch (a scratch venv)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--network", choices=tuple(TORCH_NETWORKS), default="config_a")
    parser.add_argument("--precisions", default="f32",
                        help=f"comma-separated, of {sorted(JAX_PRECISION)} (CPU: f32 only)")
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed block")
    parser.add_argument("--pairs", type=int, default=3, help="alternated A B blocks")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample_batch", type=int, default=64)
    parser.add_argument("--num_devices", type=int, default=2,
                        help="JAX devices (host devices on a CPU; the first N accelerators)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--worker_logs", action="store_true", help="keep workers' stderr in OUT")
    parser.add_argument("--out", default="runs/vs_pytorch")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    if any(p not in JAX_PRECISION for p in precisions):
        parser.error(f"--precisions must be of {sorted(JAX_PRECISION)}, got {args.precisions}")
    if args.worker == "jax":
        _jax_worker(args.num_devices, args.device, args.network, precisions[0])
        return []
    if not (args.reference and args.torch_python):
        parser.error("--reference and --torch_python are required")
    if args.device == "cpu" and precisions != ["f32"]:
        parser.error("on a CPU only --precisions f32 is measured (XLA:CPU computes bf16 "
                     "convolutions in float32)")
    os.makedirs(args.out, exist_ok=True)
    load = f"load average {os.getloadavg()[0]:.1f} at the start"
    done = os.path.join(args.out, "vs_pytorch_rows.jsonl")  # resumed row by row
    rows = []
    if os.path.exists(done):
        with open(done) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    for batch in (int(b) for b in args.batches.split(",")):
        for precision in precisions:
            if any((r["batch"], r["precision"], r["network"]) == (batch, precision, args.network)
                   for r in rows):
                continue
            try:
                row = compare(args, batch, precision)
            except Exception as e:  # keep the rows already measured; say which one failed
                print(f"batch {batch}, {precision}: FAILED: {e!r}", flush=True)
                continue
            row["sample_batch"] = args.sample_batch
            rows.append(row)
            with open(done, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"batch {batch}, {precision}: jax {row['jax']['step_median']:.3g} s/step, "
                  f"torch {row['torch']['step_median']:.3g} s/step", flush=True)
    rows = [r for r in rows if r["network"] == args.network]
    if not rows:
        raise SystemExit("no row was measured")
    text = table(rows, load)
    info = {"machine": f"{tables.cpu_model()}, {os.cpu_count()} CPU cores",
            "versions": {"jax": rows[0]["jax"]["versions"],
                         "torch": rows[0]["torch"]["versions"]}, "load": load,
            "args": vars(args), "rows": rows}
    with open(os.path.join(args.out, "vs_pytorch.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(args.out, "vs_pytorch.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(json.dumps({k: info[k] for k in ("machine", "versions", "load")}))
    return rows


if __name__ == "__main__":
    main()
