"""Ambient-Omni locality and mixed pools at CPU scale on the embedded digits.

    python benchmarks/ambient_ood_mnist.py --out runs/ambient_ood --seeds 0,1,2 \
        --archive benchmarks/results/ambient_ood_mnist
    python benchmarks/ambient_ood_mnist.py --out /tmp/smoke --smoke          # tiny

Target: digits 0–4, 100 of them clean (configs/ambient_ood_mnist.py). Rows, each with the same
network and the same number of training images:
  target_all      EDM on every target digit, clean (the upper bound no row can have)
  clean_only      the 100 clean digits alone
  naive           + digits 5–9 (out of distribution) at every σ
  locality_fixed  + digits 5–9 below a fixed σ_max only
  locality_crops  + digits 5–9 below each image's σ_max from the crop classifier
  mixed           + the other target digits, each blurred / JPEG-compressed / motion-blurred,
                  above its component's fixed σ_min
  both            + the mixed pool above σ_min and digits 5–9 below σ_max
  mixed_classifier + the mixed pool, each image above its own σ_min from the noise classifier
                  (its σ_min median per corruption in the row's 'sigma_min_by_type')
Columns: classifier-feature Fréchet distance and sliced W₁ of the samples against the target
digits only, memorisation and precision/recall (the evaluation's), the share of pool images in
the batches, the annotation's σ_max / σ_min medians, and the annotation's own compute (images
the locality denoiser and the crop classifier trained on; equal training images per row).
Several seeds: mean ± 95% interval (the data and annotations stay the same; the training seed
changes). Every row resumes where it stopped; OUT/results.json, OUT/table.md (with each row's
difference to clean_only on the same seed), OUT/samples_seed<S>.png.
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

ROWS = ("target_all", "clean_only", "naive", "locality_fixed", "locality_crops", "mixed", "both",
        "mixed_classifier")
# The data set of each row (the pool's prepared set); every other row: the digits-5–9 pool.
DATA = {"mixed": "mixed", "mixed_classifier": "mixed", "both": "both"}


def row_config(row: str, out: str, total_images: int, seed: int, smoke: bool):
    from configs import ambient_ood_mnist

    c = ambient_ood_mnist.get_config("clean_only" if row == "target_all" else row)
    if smoke:
        ambient_ood_mnist.tiny(c)
    c.seed = seed
    if total_images:
        c.train.total_images = total_images
    c.corrupt.output_dir = os.path.join(out, "data", DATA.get(row, "ood"))
    c.eval.cache_dir = os.path.join(out, "cache")
    c.eval.round_num_samples = c.eval.num_samples
    if row == "target_all":  # plain EDM on every target digit (the source of the split)
        c.mode = "edm"
    return c


def row_workdir(out: str, row: str, seed: int) -> str:
    return os.path.join(out, f"seed{seed}", row)


def annotation_compute(record: dict | None, config) -> dict:
    """Images the annotation trained on (the locality denoiser, the crop classifier's and the
    noise classifier's batches); 0 for annotations that train nothing."""
    if not record:
        return {"annotation_images": 0}
    images = 0
    if record["method"] == "crops":
        images += int(config.ambient.locality.denoiser_images)
        meta = record.get("crop_classifier", {})
        images += int(meta.get("steps", 0)) * int(config.ambient.crop_classifier.batch_size)
    if "classifier" in record and isinstance(record["classifier"], dict):
        images += int(record["classifier"].get("steps", 0)) * int(
            config.ambient.classifier.batch_size)
    return {"annotation_images": images}


def run_row(row: str, out: str, total_images: int, seed: int, smoke: bool,
            archive: str = "") -> dict:
    """One row; a row already in OUT (or in ARCHIVE, a folder the results are committed to so a
    table can be built across machines) is read, not rerun."""
    from sfbd_jax import evaluate, run
    from sfbd_jax.data import annotations as annotations_lib
    from sfbd_jax.methods import ambient
    from sfbd_jax.utils import jsonfile

    config = row_config(row, out, total_images, seed, smoke)
    workdir = row_workdir(out, row, seed)
    done = os.path.join(workdir, "benchmark_row.json")
    kept = tables.archived_file(archive, seed, row)
    row_result = tables.finished_row(done, kept)
    if row_result:
        return row_result
    start = time.time()
    run.run(config, annotator_home(out, workdir, row))
    if row == "target_all":
        result = evaluate.evaluate(config, workdir, "latest")
        facts: dict = {"low_quality_share": 0.0}
        record = None
    else:
        result = facts = jsonfile.read_json(os.path.join(workdir, ambient.SUMMARY), {})
        record = annotations_lib.record(config.corrupt.output_dir, facts["annotation"])
    summary = facts.get("annotation_summary") or {}
    out_row = {**tables.metrics_of(result), "row": row, "seed": seed,
               "low_quality_share": facts["low_quality_share"],
               "sigma_min_median": (summary.get("sigma_min_quantiles") or {}).get("median"),
               "sigma_max_median": (summary.get("sigma_max_quantiles") or {}).get("median"),
               "sigma_min_by_type": {k: v["sigma_min_quantiles"]["median"]
                                     for k, v in facts.get("annotation_by_type", {}).items()},
               "train_images": config.train.total_images, **annotation_compute(record, config),
               "seconds": time.time() - start, "machine": tables.machine()}
    tables.record_row(out_row, done, kept)
    return out_row


def annotator_home(out: str, workdir: str, row: str) -> str:
    """The run directory, its annotator/ linked to OUT/annotator/<data>: the locality
    denoiser, crop and noise classifiers depend on the data and their own seeds only, so every
    row and training seed on one data set shares them (and its annotations)."""
    shared = os.path.join(out, "annotator", DATA.get(row, "ood"))
    os.makedirs(shared, exist_ok=True)
    os.makedirs(workdir, exist_ok=True)
    link = os.path.join(workdir, "annotator")
    if not os.path.lexists(link):
        os.symlink(shared, link)
    return workdir


COLUMNS = ((("classifier_fd", "classifier FD ↓", 2), ("swd", "sliced W₁ ↓", 4))
           + tables.NEIGHBOUR_COLUMNS)


PAIRED = (("classifier_fd", "classifier FD", 2), ("swd", "sliced W₁", 4),
          ("precision", "precision", 3), ("recall", "recall", 3), ("coverage", "coverage", 3))


def _median(value) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3g}"


def table(results: list[dict]) -> str:
    lines = ["| row | " + " | ".join(h for _, h, _ in COLUMNS)
             + " | pool share of batches | σ_min median | σ_max median | annotation images "
             "| training images | seeds |",
             "|---|" + "---|" * len(COLUMNS) + "---|---|---|---|---|---|"]
    for row in dict.fromkeys(r["row"] for r in results):
        group = [r for r in results if r["row"] == row]
        r = group[0]
        lines.append(f"| {row} | " + " | ".join(tables.cells(group, COLUMNS))
                     + f" | {r['low_quality_share']:.2f} | {_median(r['sigma_min_median'])} | "
                     f"{_median(r['sigma_max_median'])} | {r['annotation_images']:,} | "
                     f"{r['train_images']:,} | "
                     + ",".join(str(g["seed"]) for g in group) + " |")
    return "\n".join(lines)


def plot_first_seed(results: list[dict], out: str) -> None:
    """OUT/samples_seed<S>.png: the final samples of every row of the first seed, where this
    machine still has them (rows read from an archive may not)."""
    import ambient_mnist

    if not results:
        return
    seed = results[0]["seed"]
    rows = [{**r, "workdir": row_workdir(out, r["row"], seed)} for r in results
            if r["seed"] == seed]
    have = [r for r in rows
            if os.path.exists(os.path.join(r["workdir"], "samples", "final.png"))]
    if have:
        ambient_mnist.plot_samples(have, os.path.join(out, f"samples_seed{seed}.png"))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--total_images", type=int, default=0,
                        help="training images per row (0 = the config's)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (same data)")
    parser.add_argument("--smoke", action="store_true", help="tiny (the test suite)")
    parser.add_argument("--archive", default="", help="copy each finished row (a few kB) "
                        "here and reuse it, e.g. benchmarks/results/ambient_ood_mnist")
    args = parser.parse_args(argv)
    devices.configure_cpu_devices(0)
    logging.set_verbosity(logging.INFO)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in args.rows.split(","):
            if row not in ROWS:
                raise ValueError(f"unknown row {row!r}; rows: {ROWS}")
            print(f"[ambient_ood] seed {seed} {row}", flush=True)
            results.append(run_row(row, out, args.total_images, seed, args.smoke,
                                   os.path.abspath(args.archive) if args.archive else ""))
    paired = tables.paired_table(results, "clean_only", PAIRED)
    text = table(results) + ("\n\n" + paired if paired else "")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    plot_first_seed(results, out)
    print(text)
    print(f"[ambient_ood] done in {time.time() - start:.0f} s; results in {out}")
    return text


if __name__ == "__main__":
    main()
