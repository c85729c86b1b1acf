"""At which training budget does the MNIST table's oracle make recognisable digits?

    python benchmarks/budget_probe.py --out runs/budget_probe --points 1,2,4,8,16
    python benchmarks/budget_probe.py --out /tmp/probe --smoke          # tiny, for the tests
    python benchmarks/budget_probe.py --out runs/probe_lr3e-3 --points 4 --set optim.lr=3e-3

Trains the oracle row of ``reproduce_mnist.py`` (EDM on all 5,000 clean digits: the table's
network, optimiser and batch) once, for max(points) × the table's budget B (13,440 images),
keeping the checkpoint at every multiple of B. The learning rate is constant after its warm-up
and the EMA's half-life depends only on the images seen so far, so the checkpoint at p·B holds
the model a run of budget p·B ends with. Each point is evaluated with the table's metrics (500
samples, its evaluation key) plus the evaluation classifier's mean confidence and the fraction
of samples it recognises (top probability ≥ 0.9; real digits score the figure printed for
scale), and gets a 64-sample grid. Points already evaluated are read back (the training resumes
from its latest checkpoint), so the probe can be built across sessions. Writes
OUT/budget_probe.json, OUT/budget_probe.md and OUT/budget_probe_samples.png.

``--set section.key=value`` (repeatable) changes the oracle's config, e.g. its learning rate,
to ask whether another setting reaches the same metrics with fewer images; the overrides are
recorded in budget_probe.json and headed in budget_probe.md, and an OUT holding a probe with
other overrides is refused (one setting per OUT). ``--against OTHER/budget_probe.json``
adds OUT/budget_probe_paired.md: this probe minus the other at each budget both have, paired
by seed (e.g. a learning rate against the table's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import reproduce_mnist  # noqa: E402
import tables  # noqa: E402

COLUMNS = (("classifier_fd", "classifier FD ↓", 2), ("swd", "sliced W₁ ↓", 4),
           ("confident_fraction", "recognised (p ≥ 0.9) ↑", 3),
           ("classifier_confidence", "mean confidence ↑", 3),
           ("precision", "precision ↑", 3), ("recall", "recall ↑", 3))


def probe_config(out: str, seed: int, points: list[int], smoke: bool,
                 overrides: list[str] = ()):
    """The oracle row's config (with ``overrides``, ``section.key=value``) trained for
    max(points) budgets, a checkpoint at each budget. B stays the table's budget in images."""
    from sfbd_jax.config_checks import apply_overrides

    c = reproduce_mnist.row_config("smoke" if smoke else "sigma0.2", seed, "oracle", out)
    budget = c.train.total_images
    apply_overrides(c, list(overrides))
    c.train.total_images = budget
    base_steps = c.train.total_images // c.train.batch_size
    c.train.total_images = max(points) * base_steps * c.train.batch_size
    c.train.checkpoint_every_steps = base_steps
    c.train.max_checkpoints = max(points) + 1
    c.train.sample_every_steps = 0
    return c, base_steps


def real_confidence(config) -> dict:
    """The evaluation classifier's confidence on the real digits of the reference (scale)."""
    from sfbd_jax.evaluation import classifier as classifier_lib
    from sfbd_jax.evaluation import evaluator

    reference = evaluator.reference_dataset(config)
    clf = classifier_lib.load_or_train(config.eval.classifier, reference,
                                       config.eval.cache_dir)
    top = clf.probabilities(reference.images).max(axis=1)
    return {"classifier_confidence": float(top.mean()),
            "confident_fraction": float(np.mean(top >= evaluator.CONFIDENT_PROBABILITY)),
            "count": int(len(top))}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", default="1,2,4,8,16",
                        help="multiples of the table's training budget to evaluate")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets (the test suite)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a change to the oracle's config (repeatable), e.g. optim.lr=3e-3")
    parser.add_argument("--against", default="", metavar="JSON",
                        help="another probe's budget_probe.json: a table of the differences")
    args = parser.parse_args(argv)
    if args.against and not os.path.isfile(args.against):
        parser.error(f"--against {args.against}: no such file")
    points = sorted({int(p) for p in args.points.split(",")})

    import jax
    from absl import logging

    from sfbd_jax import evaluate, run
    from sfbd_jax.training import loop
    from sfbd_jax.utils import devices, images, jsonfile

    devices.configure_cpu_devices(0)
    logging.set_verbosity(logging.INFO)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    try:
        config, base_steps = probe_config(out, args.seed, points, args.smoke, args.set)
    except (ValueError, TypeError) as err:
        parser.error(f"--set: {err}")
    overrides = dict(s.split("=", 1) for s in args.set)
    workdir = os.path.join(out, f"seed{args.seed}", "oracle_long")
    record_path = os.path.join(out, "budget_probe.json")
    record = jsonfile.read_json(record_path, {"points": [], "overrides": overrides})
    if record.get("overrides", {}) != overrides:
        parser.error(f"{record_path} holds a probe with the overrides "
                     f"{record.get('overrides', {})}, not {overrides}: use another --out")
    done = {(r["seed"], r["point"]) for r in record["points"]}
    if "real" not in record:
        record["real"] = real_confidence(config)
    start = time.time()
    if any((args.seed, p) not in done for p in points):
        run._setup()
        loop.train_and_evaluate(config, workdir)  # resumes; a no-op once trained
        experiment = loop.Experiment(config)
        for p in points:
            if (args.seed, p) in done:
                continue
            step = p * base_steps
            result = evaluate.evaluate(config, workdir, f"step:{step}")
            params, _, _ = evaluate.load_params(experiment, workdir, f"step:{step}")
            grid = experiment.generate(params, 64, jax.random.PRNGKey(args.seed))
            images.save_png(images.make_grid(grid), os.path.join(out, f"seed{args.seed}",
                                                                 f"samples_x{p}.png"))
            record["points"].append({**tables.metrics_of(result), "seed": args.seed,
                                     "point": p, "step": step,
                                     "train_images": step * config.train.batch_size})
            jsonfile.write_json(record_path, record)
    jsonfile.write_json(record_path, record)
    text = table(record)
    with open(os.path.join(out, "budget_probe.md"), "w") as f:
        f.write(text + "\n")
    plot_samples(record, out)
    print(text)
    if args.against:
        paired = paired_table(record, jsonfile.read_json(args.against, None))
        with open(os.path.join(out, "budget_probe_paired.md"), "w") as f:
            f.write(paired + "\n")
        print(paired)
    print(f"[budget_probe] done in {time.time() - start:.0f} s; results in {out}")
    return record["points"]


def table(record: dict) -> str:
    """Markdown: one line per budget, mean ± 95% interval over the seeds probed."""
    lines = ["| training images | × table budget | " + " | ".join(h for _, h, _ in COLUMNS)
             + " | seeds |", "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    if record.get("overrides"):
        lines.insert(0, "Overrides of the oracle's config: " + ", ".join(
            f"`{k}={v}`" for k, v in sorted(record["overrides"].items())) + "\n")
    for p in sorted({r["point"] for r in record["points"]}):
        group = [r for r in record["points"] if r["point"] == p]
        lines.append(f"| {group[0]['train_images']:,} | {p} | "
                     + " | ".join(tables.cells(group, COLUMNS))
                     + f" | {','.join(str(g['seed']) for g in group)} |")
    real = record["real"]
    lines.append(f"| real digits ({real['count']:,}) | – | – | – | "
                 f"{real['confident_fraction']:.3f} | {real['classifier_confidence']:.3f} | – | – "
                 "| – |")
    return "\n".join(lines)


def setting(record: dict) -> str:
    """The overrides of a probe, 'optim.lr=3e-3', or "the table's setting" for none."""
    overrides = record.get("overrides") or {}
    return ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "the table's setting"


def paired_table(record: dict, baseline: dict) -> str:
    """Markdown: ``record``'s probe minus ``baseline``'s at every budget both evaluated,
    mean ± 95% interval over the seeds both have (bold where it excludes 0)."""
    lines = []
    both = sorted({r["point"] for r in record["points"]}
                  & {r["point"] for r in baseline["points"]})
    for p in both:
        results = ([{**r, "row": f"{p} × B"} for r in record["points"] if r["point"] == p]
                   + [{**r, "row": "base"} for r in baseline["points"] if r["point"] == p])
        text = tables.paired_table(results, "base", COLUMNS).splitlines()
        if not lines:
            lines = [text[0].replace("row − base (same seed)",
                                     f"({setting(record)}) − ({setting(baseline)}), same seed"),
                     text[1]]
        lines += text[2:]
    return "\n".join(lines)


def plot_samples(record: dict, out: str) -> None:
    """The 64-sample grids of the first seed, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    seed = min((r["seed"] for r in record["points"]), default=None)
    panels = [(r["point"], os.path.join(out, f"seed{seed}", f"samples_x{r['point']}.png"))
              for r in sorted(record["points"], key=lambda r: r["point"]) if r["seed"] == seed]
    panels = [(p, path) for p, path in panels if os.path.exists(path)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), squeeze=False)
    for ax, (p, path) in zip(axes[0], panels, strict=True):
        ax.imshow(np.asarray(Image.open(path)), cmap="gray")
        ax.set_title(f"{p} × budget", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "budget_probe_samples.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
