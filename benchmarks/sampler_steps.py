"""Does the sampler's step count change what the MNIST table measures?

    python benchmarks/sampler_steps.py --runs runs/eq --equal_compute \\
        --plan 0:sigma0.2,1:sigma0.2,2:sigma0.2 --rows sfbd_quick,clean_only --steps 10,18,32 \\
        --out runs/sampler_steps --archive benchmarks/results/sampler_steps
    python benchmarks/sampler_steps.py ... --finished_only      # the table from what is kept

The table's metrics are measured on 500 samples of the probability-flow ODE sampler with
``sampler.num_steps`` = 10 Heun levels (19 network evaluations a sample). This script takes the
final checkpoint of rows that ``reproduce_mnist.py`` trained (under ``--runs``, the same
``--plan``/``--rows``/``--equal_compute`` as that command) and evaluates it again with each of
``--steps`` (the same evaluation key, so the same starting noise; the table's own count
reproduces the row's recorded metrics), to tell which of the table's differences are the
models' and which the sampler's discretisation. Each (seed, variant, row, steps) record is kept
in OUT (and ``--archive``) as soon as it is measured and read back afterwards, so the table
can be built across sessions; a row not trained on this machine is skipped with a note.
Writes OUT/sampler_steps.json and OUT/sampler_steps.md: each row at each step count (mean ±
95% interval over seeds), then each step count's difference to the smallest, paired by seed,
then (several rows) each row minus ``--baseline`` at each step count, paired by seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reproduce_mnist  # noqa: E402
import tables  # noqa: E402

COLUMNS = (("classifier_fd", "classifier FD ↓", 2), ("swd", "sliced W₁ ↓", 4),
           ("noise_sigma", "residual noise σ̂ ↓", 3),
           ("confident_fraction", "recognised (p ≥ 0.9) ↑", 3),
           ("precision", "precision ↑", 3), ("recall", "recall ↑", 3),
           ("coverage", "coverage ↑", 3),
           ("memorised_fraction_train_pixel", "memorised: train set, px", 3))
ROUNDED_ROWS = ("sfbd", "sfbd_lean", "sfbd_quick", "sfbd_fewer_quick", "emdiffusion",
                "clean_only")


def final_checkpoint(row: str, config) -> str:
    """The --checkpoint spec of a row's final model: the state after its last round for the
    rows that keep one per round (the clean-only row: round 0), else the newest state."""
    return f"round:{config.sfbd.rounds}" if row in ROUNDED_ROWS else "latest"


def record_path(folder: str, seed: int, variant: str, row: str, steps: int) -> str:
    """Where the record of one (seed, variant, row, steps) lives in ``folder`` ("" = none)."""
    return (os.path.join(folder, f"seed{seed}", variant, row, f"steps{steps}.json")
            if folder else "")


def measure(runs: str, seed: int, variant: str, row: str, steps: int,
            equal_compute: bool) -> dict | None:
    """Evaluate the final checkpoint of the row trained under ``runs`` with ``steps`` sampler
    levels; None when that run (or its final checkpoint) is not on this machine."""
    from sfbd_jax import evaluate

    workdir = reproduce_mnist.row_workdir(runs, seed, variant, row, equal_compute)
    if not os.path.exists(os.path.join(workdir, "reproduce_row.json")):
        print(f"[sampler_steps] {workdir}: not a finished row here, skipped", flush=True)
        return None
    config = reproduce_mnist.row_config(variant, seed, row, runs, equal_compute=equal_compute)
    checkpoint = final_checkpoint(row, config)
    config.sampler.num_steps = steps
    start = time.time()
    result = evaluate.evaluate(config, workdir, checkpoint)
    return {**tables.metrics_of(result), "seed": seed, "variant": variant, "row": row,
            "steps": steps, "sampler_num_steps": result["sampler_num_steps"],
            "checkpoint": checkpoint, "workdir": workdir,
            "seconds": time.time() - start, "machine": tables.machine()}


def collect(plan: list[tuple[int, str]], rows: list[str], steps: list[int], runs: str,
            out: str, archive: str = "", equal_compute: bool = False,
            finished_only: bool = False) -> list[dict]:
    """The records of ``plan`` × ``rows`` × ``steps``: read back from OUT or the archive,
    measured when missing (unless ``finished_only``)."""
    records = []
    for seed, variant in plan:
        for row in rows:
            for n in steps:
                done = record_path(out, seed, variant, row, n)
                kept = record_path(archive, seed, variant, row, n)
                record = tables.finished_row(done, kept)
                if not record and not finished_only:
                    record = measure(runs, seed, variant, row, n, equal_compute)
                    if record:
                        tables.record_row(record, done, kept)
                if record:
                    records.append(record)
    return records


def paired_diffs(group: list[dict], base: dict) -> list[dict]:
    """Per record of ``group`` (seed order), its COLUMNS minus those of ``base[seed]``."""
    return [tables.differences(r, base[r["seed"]], COLUMNS) for r in group]


def diff_line(variant: str, label: str, group: list[dict], base: dict) -> str:
    """A table line: ``group``'s paired differences to ``base`` (bold: interval excludes 0)."""
    return (f"| {variant} | {label} | "
            + " | ".join(tables.cells(paired_diffs(group, base), COLUMNS, bold_nonzero=True,
                                      signed=True))
            + f" | {','.join(str(g['seed']) for g in group)} |")


def table(records: list[dict], baseline: str = "") -> str:
    """Markdown: each (variant, row, steps) over its seeds, then each step count's paired
    difference to the row's smallest one, then (with ``baseline``, a row) each other row's
    paired difference to ``baseline`` sampled with the same number of steps — does a gap
    between rows close when both are sampled more finely?"""
    from sfbd_jax.diffusion import sampler

    head = "| σ_ζ variant | row | sampler steps (evaluations) | "
    lines = [head + " | ".join(h for _, h, _ in COLUMNS) + " | seeds |",
             "|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
    groups = {}
    for r in records:
        groups.setdefault((r["variant"], r["row"]), {}).setdefault(r["steps"], []).append(r)

    def evaluations(n: int) -> int:
        return sampler.num_evaluations(sampler.karras_sigmas(n))

    for (variant, row), by_steps in groups.items():
        for n in sorted(by_steps):
            group = sorted(by_steps[n], key=lambda r: r["seed"])
            lines.append(f"| {variant} | {row} | {n} ({evaluations(n)}) | "
                         + " | ".join(tables.cells(group, COLUMNS))
                         + f" | {','.join(str(g['seed']) for g in group)} |")
    lines += ["", head.replace("sampler steps (evaluations)", "steps − fewest (paired)")
              + " | ".join(h.rstrip(" ↑↓") for _, h, _ in COLUMNS) + " | seeds |",
              "|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for (variant, row), by_steps in groups.items():
        fewest = min(by_steps)
        base = {r["seed"]: r for r in by_steps[fewest]}
        for n in sorted(by_steps)[1:]:
            group = sorted((r for r in by_steps[n] if r["seed"] in base),
                           key=lambda r: r["seed"])
            lines.append(diff_line(variant, f"{row} | {n} − {fewest}", group, base))
    across = []
    for (variant, row), by_steps in groups.items():
        if row == baseline or (variant, baseline) not in groups:
            continue
        for n in sorted(set(by_steps) & set(groups[variant, baseline])):
            base = {r["seed"]: r for r in groups[variant, baseline][n]}
            group = sorted((r for r in by_steps[n] if r["seed"] in base),
                           key=lambda r: r["seed"])
            if group:
                across.append(diff_line(variant, f"{row} − {baseline} | {n}", group, base))
    if across:
        lines += ["", head.replace("row | sampler steps (evaluations)",
                                   "rows (paired) | sampler steps")
                  + " | ".join(h.rstrip(" ↑↓") for _, h, _ in COLUMNS) + " | seeds |",
                  "|---|---|---|" + "---|" * len(COLUMNS) + "---|", *across]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="reproduce_mnist.py's --out")
    parser.add_argument("--out", required=True)
    parser.add_argument("--archive", default="", help="keep every record here too")
    parser.add_argument("--plan", default="0:sigma0.2", help="seed:variant pairs")
    parser.add_argument("--rows", default="sfbd", help="rows of reproduce_mnist.py")
    parser.add_argument("--steps", default="10,18,32", help="sampler.num_steps values")
    parser.add_argument("--baseline", default="",
                        help="a row: tabulate every other row minus it, paired by seed, at "
                             "each step count both have (default: the first of --rows when "
                             "--rows names several)")
    parser.add_argument("--equal_compute", action="store_true",
                        help="the rows of reproduce_mnist.py --equal_compute")
    parser.add_argument("--finished_only", action="store_true",
                        help="tabulate what is kept; evaluate nothing")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(reproduce_mnist.ROW_ORDER))
    if unknown:
        raise ValueError(f"unknown rows {unknown}: choose from {reproduce_mnist.ROW_ORDER}")
    if args.baseline and args.baseline not in rows:
        raise ValueError(f"--baseline={args.baseline} is not one of --rows={args.rows}")
    steps = sorted({int(n) for n in args.steps.split(",")})
    if steps[0] < 2:
        raise ValueError(f"--steps={args.steps}: the sampler needs at least 2 levels")

    from absl import logging

    from sfbd_jax.utils import devices, jsonfile

    devices.configure_cpu_devices(0)
    logging.set_verbosity(logging.INFO)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    records = collect(reproduce_mnist.parse_plan(args.plan), rows, steps,
                      os.path.abspath(args.runs), out, args.archive, args.equal_compute,
                      args.finished_only)
    jsonfile.write_json(os.path.join(out, "sampler_steps.json"), records)
    baseline = args.baseline or (rows[0] if len(rows) > 1 else "")
    text = table(records, baseline)
    with open(os.path.join(out, "sampler_steps.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"[sampler_steps] {len(records)} records in {time.time() - start:.0f} s; "
          f"results in {out}")
    return text


if __name__ == "__main__":
    main()
