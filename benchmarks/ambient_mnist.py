"""Ambient Diffusion Omni at CPU scale on the embedded MNIST-5k digits.

    python benchmarks/ambient_mnist.py --out runs/ambient_mnist              # blur σ_B = 1 px
    python benchmarks/ambient_mnist.py --out runs/ambient_mnist --variant jpeg
    python benchmarks/ambient_mnist.py --out /tmp/smoke --smoke              # tiny

Rows (configs/ambient_mnist.py; 10% clean, 90% corrupted; the same network and number of
training images for each):
  oracle            EDM on all 5,000 clean digits
  clean_only        the 500 clean digits only (annotation 'exclude')
  every_sigma       all 5,000 used at every σ, corrupted ones as if clean ('every_sigma')
  ambient_fixed     Ambient-Omni, σ_min fixed for the corruption ('fixed')
  ambient_classifier  Ambient-Omni, σ_min per image from the noise-conditional classifier
Columns: classifier-feature Fréchet distance and sliced Wasserstein distance of 500 samples
against the 5,000 clean originals; memorisation (against the row's clean training images and
against all 5,000), precision/recall and density/coverage in the classifier's features; the
low-quality share of the training batches. Several seeds: mean ± 95% interval.
``--seeds 0,1`` repeats the rows with other training seeds (the data and annotations stay the
same). Every row resumes where it stopped; ``--archive DIR`` also keeps each row's result (a
few kB) in DIR and reuses it on any machine, so a table is built across sessions, and
``--finished_only`` tabulates the rows finished so far, training nothing:
    python benchmarks/ambient_mnist.py --out runs/ambient_mnist --seeds 0,1,2 \
        --archive benchmarks/results/ambient_mnist
Writes OUT/results_VARIANT.json, OUT/table_VARIANT.md
and OUT/samples_VARIANT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tables  # noqa: E402
from absl import logging  # noqa: E402

from sfbd_jax.utils import devices  # noqa: E402

ROWS = ("oracle", "clean_only", "every_sigma", "ambient_fixed", "ambient_classifier")
ANNOTATION = {"clean_only": "exclude", "every_sigma": "every_sigma", "ambient_fixed": "fixed",
              "ambient_classifier": "classifier"}


def row_config(variant: str, row: str, out: str, total_images: int, seed: int = 0):
    from configs import ambient_mnist

    c = ambient_mnist.get_config(variant)
    c.seed = seed
    if total_images:
        c.train.total_images = total_images
    c.corrupt.output_dir = os.path.join(out, variant, "data")  # one data set for every row
    c.eval.cache_dir = os.path.join(out, "cache")
    c.eval.round_num_samples = c.eval.num_samples
    if row == "oracle":
        c.mode = "edm"
    else:
        c.ambient.annotation = ANNOTATION[row]
    return c


def row_workdir(out: str, variant: str, row: str, seed: int) -> str:
    return os.path.join(out, variant, row if seed == 0 else os.path.join(f"seed{seed}", row))


def run_row(variant: str, row: str, out: str, total_images: int, seed: int = 0,
            archive: str = "", finished_only: bool = False) -> dict:
    """Train and evaluate one row, or read it back when it is finished in ``out`` or kept in
    ``archive`` (a folder committed beside RESULTS.md; every row finished here is copied there
    at once). ``finished_only``: train nothing ({} for a row not finished)."""
    from sfbd_jax import evaluate, run
    from sfbd_jax.methods import ambient
    from sfbd_jax.utils import jsonfile

    config = row_config(variant, row, out, total_images, seed)
    workdir = row_workdir(out, variant, row, seed)
    done = os.path.join(workdir, "benchmark_row.json")
    kept = tables.archived_file(archive, seed, f"{variant}_{row}")
    finished = tables.finished_row(done, kept)
    if finished or finished_only:
        return finished
    start = time.time()
    run.run(config, workdir)
    if row == "oracle":
        result = evaluate.evaluate(config, workdir, "latest")
        facts = {"low_quality_share": 0.0}
    else:
        result = facts = jsonfile.read_json(os.path.join(workdir, ambient.SUMMARY), {})
    out_row = {**tables.metrics_of(result), "row": row, "variant": variant, "seed": seed,
               "low_quality_share": facts["low_quality_share"],
               "annotation_summary": facts.get("annotation_summary"),
               "train_images": config.train.total_images, "seconds": time.time() - start,
               "workdir": workdir, "machine": tables.machine()}
    tables.record_row(out_row, done, kept)
    return out_row


COLUMNS = ((("classifier_fd", "classifier FD ↓", 2), ("swd", "sliced W₁ ↓", 4))
           + tables.NEIGHBOUR_COLUMNS)


def table(results: list[dict]) -> str:
    """One line per (variant, row): mean ± 95% interval over the training seeds."""
    lines = ["| corruption | row | " + " | ".join(h for _, h, _ in COLUMNS)
             + " | low-quality share of batches | σ_min (median) | seeds |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|---|---|"]
    keys = list(dict.fromkeys((r["variant"], r["row"]) for r in results))
    for variant, row in keys:
        group = [r for r in results if (r["variant"], r["row"]) == (variant, row)]
        r = group[0]
        ann = r.get("annotation_summary") or {}
        med = ann.get("sigma_min_quantiles", {}).get("median")
        if ann and ann["infinite"] == ann["count"]:
            med_s = "∞"
        else:
            med_s = "–" if med is None or not np.isfinite(med) else f"{med:.3g}"
        seeds = ",".join(str(g.get("seed", 0)) for g in group)
        lines.append(f"| {variant} | {row} | " + " | ".join(tables.cells(group, COLUMNS))
                     + f" | {r['low_quality_share']:.2f} | {med_s} | {seeds} |")
    return "\n".join(lines)


def plot_samples(results: list[dict], path: str) -> None:
    """The final samples of each row side by side (rows whose run folder is not on this
    machine — read from an archive — are left out; no figure when none is)."""
    results = [r for r in results
               if os.path.exists(os.path.join(r["workdir"], "samples", "final.png"))]
    if not results:
        logging.info("No sample figure: no row's samples are on this machine.")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(results), figsize=(3 * len(results), 3.7))
    for ax, r in zip(np.atleast_1d(axes), results, strict=True):
        ax.imshow(np.asarray(Image.open(os.path.join(r["workdir"], "samples", "final.png"))),
                  cmap="gray")
        ax.set_title(f"{r['row']}\nFD {r['classifier_fd']:.2f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", default="blur", help="configs/ambient_mnist.py variant")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--total_images", type=int, default=0,
                        help="training images per row (0 = the config's)")
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1 (same data)")
    parser.add_argument("--smoke", action="store_true", help="tiny (the test suite)")
    parser.add_argument("--archive", default="", help="copy each finished row (a few kB) "
                        "here and reuse it, e.g. benchmarks/results/ambient_mnist")
    parser.add_argument("--finished_only", action="store_true",
                        help="tabulate the rows finished so far; train nothing")
    args = parser.parse_args(argv)
    variant = "smoke" if args.smoke else args.variant
    devices.configure_cpu_devices(0)
    logging.set_verbosity(logging.INFO)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in args.rows.split(","):
            print(f"[ambient] {variant} seed {seed} {row}", flush=True)
            result = run_row(variant, row, out, args.total_images, seed,
                             os.path.abspath(args.archive) if args.archive else "",
                             args.finished_only)
            if result:
                results.append(result)
    text = table(results)
    with open(os.path.join(out, f"results_{variant}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, f"table_{variant}.md"), "w") as f:
        f.write(text + "\n")
    first = min(r.get("seed", 0) for r in results)
    plot_samples([r for r in results if r.get("seed", 0) == first],
                 os.path.join(out, f"samples_{variant}.png"))
    print(text)
    print(f"[ambient] done in {time.time() - start:.0f} s; results in {out}")
    return text


if __name__ == "__main__":
    main()
