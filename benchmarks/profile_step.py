"""Where a training step's time goes: XLA's per-operation profile of sfbd_jax's train step on
the network of benchmarks/vs_pytorch.py ("config A", 6,989,891 parameters).

    python benchmarks/profile_step.py --batch 32 --num_devices 1 --steps 5
    XLA_FLAGS=--xla_cpu_use_xnnpack=false python benchmarks/profile_step.py ...

Builds the step as the training loop does (``Experiment``), times ``--steps`` steps after the
compiling one, then records ``--trace_steps`` more with ``jax.profiler.trace`` and sums the
recorded XLA operations by HLO instruction, grouped into kinds (convolution, its gradients,
dot, fusion, collective, ...). Prints the step times, a table of the kinds and the ``--top``
costliest instructions with their HLO text, so one can see which part of the network costs what
and whether a change to the model, the layout or the XLA flags moved it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def build(batch: int, num_devices: int, overrides: dict):
    """(experiment, state, batches) for config A at ``batch`` over ``num_devices`` host devices."""
    from vs_pytorch import config_a_experiment

    from sfbd_jax.utils import devices

    devices.configure_cpu_devices(num_devices)
    return config_a_experiment(batch, num_devices, overrides)


def _instruction_table(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(HLO instruction name -> its line, computation name -> its body) of an optimised
    module's text."""
    table, bodies, current = {}, {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            bodies[current] = ""
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if m:
            table[m.group(1)] = line.strip()
            if current is not None:
                bodies[current] += line + "\n"
    return table, bodies


def _kind(line: str, bodies: dict[str, str]) -> str:
    """A coarse kind of an HLO instruction: what its fused computation does (convolution,
    dot, reduction, element-wise, layout change), the library it runs in, or its opcode."""
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = bodies.get(called.group(1), "") if called else ""
    op = re.search(r"= \S+ ([\w\-]+)\(", line)
    opcode = op.group(1) if op else "?"
    text = body or line
    library = re.search(r'"kind":"__(\w+?)_fusion"', line)
    where = f" [{library.group(1)}]" if library else ""
    if re.search(r" (all-reduce|reduce-scatter|all-gather|all-to-all|collective-permute)"
                 r"(-start)?\(", line):
        return "collective (gradient all-reduce)"
    if " convolution(" in text:
        return "convolution" + where
    if " dot(" in text:
        return "dot" + where
    if " reduce(" in text or opcode in ("reduce", "reduce-window"):
        return "reduction / group norm" + where
    if " while(" in line or opcode == "while":
        return "while loop (e.g. random bits)"
    if opcode in ("transpose", "copy") or re.search(r" (transpose|copy)\(", body) and not \
            re.search(r" (add|multiply|subtract|exponential|logistic)\(", body):
        return "transpose / copy"
    if "Dropout" in line or "bernoulli" in line or "u32[" in line.split("=")[1][:12]:
        return "dropout random bits"
    if opcode == "fusion":
        return "element-wise" + where
    return opcode


def _max_rss_gib() -> float:
    """This process's peak resident memory so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def profile(exp, state, batches, trace_steps: int) -> tuple[dict, float]:
    """Sum of the traced XLA operations' durations by name, and the traced wall time."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with jax.profiler.trace(tmp):
            for i in range(trace_steps):
                state, metrics = exp.train_step(state, batches.get(i % 4))
                jax.block_until_ready(metrics["loss"])
        wall = time.perf_counter() - t
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(files[0])
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for event in line.events:
                totals[event.name] += event.duration_ns * 1e-9
    return totals, wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num_devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4,
                        help="timed steps after compiling (at least 1)")
    parser.add_argument("--trace_steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--set", action="append", default=[],
                        help="config override key=value (e.g. model.dropout=0.0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    overrides = dict(s.split("=", 1) for s in args.set)
    t0 = time.perf_counter()
    exp, state, batches = build(args.batch, args.num_devices, overrides)
    import jax

    t = time.perf_counter()
    state, metrics = exp.train_step(state, batches.get(0))
    jax.block_until_ready(metrics["loss"])
    print(f"set-up {t - t0:.1f} s, first step (compile) {time.perf_counter() - t:.1f} s, "
          f"peak RSS so far {_max_rss_gib():.2f} GiB, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, metrics = exp.train_step(state, batches.get(i % 4))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    print("step seconds: " + " ".join(f"{s:.2f}" for s in times)
          + f"  ({args.batch / min(times):.1f} images/s at the fastest); peak RSS "
          f"{_max_rss_gib():.2f} GiB")
    if not args.trace_steps:
        return
    totals, wall = profile(exp, state, batches, args.trace_steps)
    lowered = exp.train_step.lower(state, batches.get(0))
    instructions, bodies = _instruction_table(lowered.compile().as_text())
    by_kind: dict[str, float] = collections.defaultdict(float)
    ops = {}
    for name, seconds in totals.items():
        if name in instructions:
            ops[name] = seconds
            by_kind[_kind(instructions[name], bodies)] += seconds
    accounted = sum(ops.values())
    per_step = lambda s: s / args.trace_steps  # noqa: E731
    print(f"\ntraced {args.trace_steps} steps in {wall:.2f} s; XLA operations sum to "
          f"{accounted:.2f} s over all threads/devices ({per_step(accounted):.2f} s per step)")
    print("\n| kind | s per step | share |\n|---|---|---|")
    for kind, s in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {per_step(s):.3f} | {s / accounted:.0%} |")
    print(f"\ncostliest {args.top} instructions (s per step):")
    for name, s in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{per_step(s):7.3f}  [{_kind(instructions[name], bodies)}]  "
              f"{instructions[name][:200]}")


if __name__ == "__main__":
    main()
