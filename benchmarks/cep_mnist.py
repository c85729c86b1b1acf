"""Condition corruption and CEP at CPU scale on the embedded MNIST-5k digits.

    python benchmarks/cep_mnist.py --out runs/cep_mnist
    python benchmarks/cep_mnist.py --out /tmp/smoke --smoke          # tiny, for the tests

Rows (configs/cep_mnist.py; all 5,000 digits clean, class-conditional, the same network and
number of training images for each): clean labels; η = 2.5, 5, 10, 20% of the labels flipped;
CEP-U and CEP-G (γ = 1) on clean labels. Columns, on eval.num_samples samples (an equal number
per class) against the 5,000 clean digits: classifier-feature Fréchet distance overall and its
mean over the per-class distances, the classifier's accuracy on the samples (is a sample of
class k recognised as k), sliced W₁; each at every guidance scale of --guidance (1 = the
conditional model as trained); memorisation (against the 5,000 training digits), precision/recall
and density/coverage in the classifier's features. ``--seeds 0,1,2`` repeats every row (mean ±
95% interval). Every row resumes where it stopped; ``--archive DIR`` also keeps each row's
result (a few kB) in DIR and reuses it on any machine, so a table is built across sessions
(``--finished_only`` tabulates the rows finished so far, training nothing):
    python benchmarks/cep_mnist.py --out runs/cep_mnist --seeds 0,1,2 \
        --archive benchmarks/results/cep_mnist
Writes OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tables  # noqa: E402
from absl import logging  # noqa: E402

from sfbd_jax.utils import devices  # noqa: E402

ROWS = ("clean", "flip2.5", "flip5", "flip10", "flip20", "cep_u", "cep_g")


COLUMNS = ((("classifier_fd", "classifier FD ↓", 2),
            ("classifier_fd_class_mean", "per-class FD (mean) ↓", 2),
            ("sample_class_accuracy", "accuracy on samples ↑", 3), ("swd", "sliced W₁ ↓", 4))
           + tables.NEIGHBOUR_COLUMNS)


def run_row(row: str, out: str, seed: int = 0, guidances: tuple[float, ...] = (1.0,),
            archive: str = "", finished_only: bool = False) -> dict:
    """One row, evaluated at each guidance scale. A row already in OUT, or in ARCHIVE (a folder
    the results are committed to, so the table can be built across machines), is read; a
    guidance scale it lacks is evaluated from the row's checkpoint (retrained, deterministically,
    when only the archived record is here). ``finished_only``: read back what is finished
    ({} for a row that is not), train and evaluate nothing."""
    from configs import cep_mnist
    from sfbd_jax import evaluate, run

    config = cep_mnist.get_config(row)
    config.seed = seed
    config.eval.cache_dir = os.path.join(out, "cache")
    workdir = os.path.join(out, f"seed{seed}", row)
    done = os.path.join(workdir, "benchmark_row.json")
    kept = tables.archived_file(archive, seed, row)
    out_row = tables.finished_row(done, kept)
    missing = [w for w in guidances if f"{w:g}" not in out_row.get("by_guidance", {})]
    if not missing or finished_only:
        return out_row
    if not out_row or not os.path.isdir(os.path.join(workdir, "checkpoints")):
        start = time.time()
        run.run(config, workdir)
        out_row = {"row": row, "seed": seed, "label_flip": config.corrupt.label_flip,
                   "cep": config.cep.kind, "train_images": config.train.total_images,
                   "train_seconds": time.time() - start, "by_guidance": {},
                   **out_row, "machine": tables.machine()}
    for w in missing:
        config.sampler.guidance = w
        result = evaluate.evaluate(config, workdir, "latest")
        out_row["by_guidance"][f"{w:g}"] = tables.metrics_of(result)
        tables.record_row(out_row, done, kept)
    return out_row


def table(results: list[dict]) -> str:
    """One line per (row, guidance): mean ± 95% interval over the seeds."""
    lines = ["| row | labels flipped | CEP | guidance | " + " | ".join(h for _, h, _ in COLUMNS)
             + " | seeds |", "|---|---|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for row in dict.fromkeys(r["row"] for r in results):
        group = [r for r in results if r["row"] == row]
        first = group[0]
        for w in first["by_guidance"]:
            metrics = [r["by_guidance"][w] for r in group if w in r["by_guidance"]]
            lines.append(f"| {row} | {100 * first['label_flip']:.1f}% | {first['cep']} | {w} | "
                         + " | ".join(tables.cells(metrics, COLUMNS))
                         + f" | {','.join(str(r['seed']) for r in group)} |")
    return "\n".join(lines)


# Columns of the differences to the clean-label row, paired by seed.
PAIRED = (("classifier_fd_class_mean", "per-class FD", 2),
          ("sample_class_accuracy", "accuracy on samples", 3), ("classifier_fd", "FD", 2),
          ("precision", "precision", 3), ("recall", "recall", 3))


def paired_tables(results: list[dict]) -> str:
    """For each guidance scale, every row's difference to the clean-label row of the same seed
    (mean ± 95% interval over the seeds; "" without a clean row)."""
    texts = []
    for w in dict.fromkeys(w for r in results for w in r["by_guidance"]):
        flat = [{"row": r["row"], "seed": r["seed"], **r["by_guidance"][w]}
                for r in results if w in r["by_guidance"]]
        paired = tables.paired_table(flat, "clean", PAIRED)
        if paired:
            texts.append(f"Guidance {w}:\n\n{paired}")
    return "\n\n".join(texts)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2")
    parser.add_argument("--guidance", default="1,2",
                        help="guidance scales to evaluate each row at (comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="tiny (the test suite)")
    parser.add_argument("--archive", default="", help="copy each finished row (a few kB) "
                        "here and reuse it, e.g. benchmarks/results/cep_mnist")
    parser.add_argument("--finished_only", action="store_true",
                        help="tabulate the rows finished so far; train nothing")
    args = parser.parse_args(argv)
    rows = ["smoke"] if args.smoke else args.rows.split(",")
    devices.configure_cpu_devices(0)
    logging.set_verbosity(logging.INFO)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    results = []
    for seed in (int(v) for v in args.seeds.split(",")):
        for row in rows:
            print(f"[cep] seed {seed} {row}", flush=True)
            result = run_row(row, out, seed, tuple(float(w) for w in args.guidance.split(",")),
                             os.path.abspath(args.archive) if args.archive else "",
                             args.finished_only)
            if result:
                results.append(result)
    paired = paired_tables(results)
    text = table(results) + ("\n\n" + paired if paired else "")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"[cep] done in {time.time() - start:.0f} s; results in {out}")
    return text


if __name__ == "__main__":
    main()
