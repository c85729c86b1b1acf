"""Reproduce the SFBD table at CPU scale on the embedded MNIST-5k digits.

    python benchmarks/reproduce_mnist.py --out runs/reproduce_mnist
    python benchmarks/reproduce_mnist.py --out /tmp/smoke --smoke     # tiny, for the tests

Rows (configs/reproduce_mnist.py; the same network for each, and the same number of training
images for each but SFBD's reallocations sfbd_lean, sfbd_quick and sfbd_fewer_quick):
  oracle       EDM on all 5,000 clean digits
  clean_only   EDM on the 50 clean digits only (SFBD's pretraining run for the whole budget)
  noisy        EDM on the corrupted set as given (4,950 noisy, clipped to [-1, 1], + 50 clean)
  sfbd         SFBD: pretrain on the 50, then K backward/forward rounds; one row per round
  sfbd_lean    SFBD at the same compute with K/2 rounds, the backward passes it skips spent on
               training images (configs/reproduce_mnist.py: sfbd_lean): SFBD's allocation
               of its compute between denoising and training, varied
  sfbd_quick   SFBD at the same compute and K rounds with cheaper backward passes (a coarser
               grid: 5 evaluations per image), the evaluations saved spent on training images
               (configs/reproduce_mnist.py: sfbd_quick): the same question, the other way
  sfbd_fewer_quick  SFBD at the same compute with 3/4 of the rounds on the cheaper grid
               (configs/reproduce_mnist.py: sfbd_fewer_quick): both changes at once
  online_sfbd  online SFBD at equal compute: the same pretraining, then K·R training images
               with a refresh every R/(2B) steps of N/2 noisy images (2 refreshes per SFBD
               round's worth of training: the same denoising evaluations as one backward pass);
               evaluated at the same points as SFBD's rounds (then the training images and the
               denoising evaluations spent so far equal SFBD's after round k); one row per point
  tweediediff  the ambient loss on the noisy data with σ_n = σ_ζ, each noisy image used only at
               σ > σ_ζ·√(4/3) (Ambient-Omni's mode=ambient, annotation 'fixed'), + the 50 clean
  emdiffusion  EMDiffusion at SFBD's compute: the same pretraining and training images, E-steps
               of DPS posterior samples (sfbd.backward='dps') whose cost per noisy image does
               not exceed SFBD's backward passes (configs/reproduce_mnist.py: emdiffusion)
Compute, stated per row in forward-pass equivalents (FPE): 3 per training image (forward and
backward pass), 1 per denoiser evaluation of a backward/E-step/refresh pass, 2 more per
evaluation that is differentiated (DPS). ``--equal_compute`` trains the rows without a
denoising pass (oracle, clean_only, noisy, tweediediff) for SFBD's whole compute (its FPE / 3
images) instead of SFBD's training images only (use a new --out); SFBD's compute grows with
σ_ζ (more backward levels), so the oracle and clean-only rows then run once per σ_ζ.
Columns: classifier-feature Fréchet distance and sliced Wasserstein distance of generated
samples against the 5,000 clean originals, memorisation (against the row's clean training images
and all 5,000), precision/recall and density/coverage in the classifier's features, PSNR of
D^(k) against the originals; mean ± 95% interval over seeds.

``--plan`` lists seed:variant pairs (default: seed 0 for σ_ζ = 0.2 and 0.59, seed 1 for 0.2);
``--rows`` picks rows (default all); ``--compute_dtype bfloat16`` trains every row with mixed
precision (config.model.compute_dtype; use a new --out) to measure its effect on quality.
Every run resumes where it stopped; re-running the command only redoes what is missing, and
``--finished_only`` tabulates the rows finished so far without training anything (a table built
across sessions). ``--archive DIR`` keeps every row's result (its ``reproduce_row.json``, a
few kB; no checkpoints or images) in DIR, in the same layout, as soon as the row finishes, and
reads there the rows --out lacks, so the table is rebuilt from a committed folder on a machine
that no longer has the runs: ``--out NEW --archive DIR --finished_only`` (the figures that need
a run's files are then left out). ``--also_read DIR`` (repeatable) names further archives that
are only read, never written: an ``--equal_compute`` table takes the rows it leaves unchanged
(sfbd, online_sfbd, emdiffusion) from the main archive that way. ``--retrain_lacking KEY``
trains a finished row again when its record lacks KEY, a metric added after it ran (e.g.
``noise_sigma``), and replaces the record (in ``--archive``; a read-only archive is left as it
is). Runs from the same seeds are close but not bit-identical on CPU, so its other numbers
move by about run-to-run noise (RESULTS.md, σ_ζ = 0.2: up to the seed-to-seed spread).
Writes OUT/results.json, OUT/table.md (every row and round, then the paired differences),
OUT/table_final.md (each row at the end of its budget, SFBD's reallocations also after their
first round, and the differences to SFBD paired by seed, bold where the interval excludes 0:
the summary RESULTS.md quotes) and the figures OUT/*.png.
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

ROW_ORDER = ("oracle", "clean_only", "noisy", "sfbd", "sfbd_lean", "sfbd_quick",
             "sfbd_fewer_quick", "online_sfbd", "tweediediff", "emdiffusion")
TRAINING_ONLY = ("oracle", "clean_only", "noisy", "tweediediff")  # rows without denoising
SIGMA_FREE = ("oracle", "clean_only")  # rows that never see the noisy set
# SFBD with its compute split differently (configs/reproduce_mnist.py: a function each).
ALLOCATION_ROWS = ("sfbd_lean", "sfbd_quick", "sfbd_fewer_quick")
FPE_PER_TRAINING_IMAGE, FPE_PER_GRADIENT = 3, 2


def shared_row(row: str, equal_compute: bool = False) -> bool:
    """Whether ``row`` is one run for every σ_ζ: the rows that never see the noisy set, unless
    they train for SFBD's whole compute, which grows with σ_ζ (more backward levels)."""
    return row in SIGMA_FREE and not equal_compute


def sfbd_compute(c) -> int:
    """SFBD's whole compute in FPE under config ``c``: its training images and its K backward
    passes over the noisy set."""
    from sfbd_jax.config_checks import noisy_count
    from sfbd_jax.methods import backward

    images = c.sfbd.pretrain_images + c.sfbd.rounds * c.sfbd.images_per_round
    evaluations, _ = backward.cost_per_image(c, c.corrupt.sigma)
    return FPE_PER_TRAINING_IMAGE * images + c.sfbd.rounds * noisy_count(c) * evaluations


def row_config(variant: str, seed: int, row: str, out: str, budget_scale: float = 1.0,
               compute_dtype: str = "float32", equal_compute: bool = False):
    """The config of one row: configs/reproduce_mnist.py with the row's mode and data;
    ``budget_scale`` multiplies every training length (e.g. 10 on a GPU); ``equal_compute``:
    the rows without a denoising pass train for SFBD's whole compute (``sfbd_compute`` / 3
    images) rather than for SFBD's training images."""
    from configs import reproduce_mnist

    c = reproduce_mnist.get_config(variant)
    c.model.compute_dtype = compute_dtype
    if budget_scale != 1.0:
        scale = lambda n: int(round(n * budget_scale / c.train.batch_size)) * c.train.batch_size  # noqa: E731
        c.sfbd.pretrain_images = scale(c.sfbd.pretrain_images)
        c.sfbd.images_per_round = scale(c.sfbd.images_per_round)
    budget = c.sfbd.pretrain_images + c.sfbd.rounds * c.sfbd.images_per_round
    if equal_compute and row in TRAINING_ONLY:
        images = sfbd_compute(c) // FPE_PER_TRAINING_IMAGE
        budget = images - images % c.train.batch_size
    c.seed = seed
    c.corrupt.split_seed, c.corrupt.noise_seed = seed, 1000 + seed
    c.corrupt.output_dir = os.path.join(out, f"seed{seed}", variant, "data")
    c.eval.cache_dir = os.path.join(out, "cache")
    c.train.total_images = budget
    if row == "oracle":
        c.mode = "edm"
    elif row == "clean_only":
        c.mode, c.sfbd.rounds, c.sfbd.pretrain_images = "sfbd", 0, budget
        if shared_row(row, equal_compute):
            c.corrupt.output_dir = os.path.join(out, f"seed{seed}", "clean_only", "data")
    elif row == "noisy":  # the corrupted images clipped to [-1, 1] + the 50 clean
        c.mode, c.data.use_prepared, c.data.prepared_group = "edm", True, "noisy"
    elif row == "online_sfbd":
        c.mode = "online_sfbd"
        steps_per_round = c.sfbd.images_per_round // c.train.batch_size
        c.online.train_images = c.sfbd.rounds * c.sfbd.images_per_round
        c.online.refresh_every_steps = steps_per_round // 2
        c.online.eval_every_steps = steps_per_round
        from sfbd_jax.config_checks import noisy_count

        c.online.refresh_count = -(-noisy_count(c) // 2)  # 2 refreshes ≈ one backward pass
        c.online.ramp_start, c.online.ramp_end = 0, steps_per_round
    elif row == "emdiffusion":
        reproduce_mnist.emdiffusion(c)
    elif row in ALLOCATION_ROWS:
        getattr(reproduce_mnist, row)(c)
        c.train.total_images = c.sfbd.pretrain_images + c.sfbd.rounds * c.sfbd.images_per_round
    elif row == "tweediediff":
        c.mode = "ambient"
        c.ambient.annotation, c.ambient.fixed_sigma_min = "fixed", 0.0  # raised to σ_n = σ_ζ
        c.ambient.known_noise = True
    elif row != "sfbd":
        raise ValueError(f"unknown row {row!r}")
    return c


def row_workdir(out: str, seed: int, variant: str, row: str,
                equal_compute: bool = False) -> str:
    shared = shared_row(row, equal_compute)
    return os.path.join(out, f"seed{seed}", row if shared else os.path.join(variant, row))


def trained_for(rows: list[dict], config) -> bool:
    """Whether every one of ``rows`` was trained for ``config``'s budget (this protocol)."""
    return all(r["train_images"] == config.train.total_images for r in rows)


def check_protocol(rows: list[dict], config, path: str) -> list[dict]:
    """``rows`` read back from ``path``, refused when they were trained for another budget
    than ``config``'s (another --budget_scale or --equal_compute in the same --out)."""
    if not trained_for(rows, config):
        other = next(r["train_images"] for r in rows
                     if r["train_images"] != config.train.total_images)
        raise ValueError(f"{path} holds a row trained for {other} images; "
                         f"this protocol trains it for {config.train.total_images} "
                         "(another --budget_scale or --equal_compute): use a new --out")
    return rows


def row_record(folder: str, seed: int, variant: str, row: str,
               equal_compute: bool = False) -> str:
    """The result file of a row in ``folder`` (a run folder or an archive: the same layout);
    "" when no folder is named."""
    return os.path.join(row_workdir(folder, seed, variant, row, equal_compute),
                        "reproduce_row.json") if folder else ""


def read_finished(out: str, archive: str, also_read: tuple[str, ...], config, seed: int,
                  variant: str, row: str, equal_compute: bool = False) -> tuple[list, str]:
    """(the finished results of a row, the file they were read from): ``out``'s record, else
    ``archive``'s (a row found only in ``out`` is copied there), else the first of the
    read-only archives ``also_read`` that holds it trained for ``config``'s budget (one of
    another protocol there is passed over); ([], "") when none does."""
    from sfbd_jax.utils import jsonfile

    done = row_record(out, seed, variant, row, equal_compute)
    kept = row_record(archive, seed, variant, row, equal_compute)
    finished = tables.finished_row(done, kept)
    if finished:
        return finished, done if os.path.exists(done) else kept
    for folder in also_read:
        path = row_record(folder, seed, variant, row, equal_compute)
        rows = jsonfile.read_json(path, []) if os.path.exists(path) else []
        if rows and trained_for(rows, config):
            return rows, path
    return [], ""


def lacking(rows: list[dict], key: str) -> bool:
    """Whether a finished row's results miss ``key`` (a metric added after it ran; "" = no
    key is required)."""
    return bool(key) and any(r.get(key) is None for r in rows)


def run_row(variant: str, seed: int, row: str, out: str, budget_scale: float,
            compute_dtype: str = "float32", equal_compute: bool = False,
            archive: str = "", also_read: tuple[str, ...] = (),
            retrain_lacking: str = "") -> list[dict]:
    """Train (or resume) one row and return its result rows (one per SFBD round). A row
    finished in ``out``, kept in ``archive`` or in one of the read-only archives ``also_read``
    is read back, unless its results lack the metric ``retrain_lacking``: then it is trained
    again (the same seeds; close to, not bit-identical with, the first run) and its record
    replaced. A row finished here is copied into ``archive`` at once (so a session cut off
    mid-command loses no finished row)."""
    import jax

    from sfbd_jax import evaluate, run
    from sfbd_jax.methods import ambient, sfbd
    from sfbd_jax.training import loop
    from sfbd_jax.utils import jsonfile

    config = row_config(variant, seed, row, out, budget_scale, compute_dtype, equal_compute)
    workdir = row_workdir(out, seed, variant, row, equal_compute)
    done_path = row_record(out, seed, variant, row, equal_compute)
    kept = row_record(archive, seed, variant, row, equal_compute)
    finished, source = read_finished(out, archive, also_read, config, seed, variant, row,
                                     equal_compute)
    if finished:
        check_protocol(finished, config, source)
        if not lacking(finished, retrain_lacking):
            return finished
        print(f"[reproduce] {source} lacks {retrain_lacking}: training the row again",
              flush=True)
    start = time.time()
    if row in ("oracle", "noisy"):
        run._setup()
        loop.train_and_evaluate(config, workdir)
        result = evaluate.evaluate(config, workdir, "latest")
        rows = [{**tables.metrics_of(result), "round": None}]
    elif row == "online_sfbd":
        from sfbd_jax.methods import online_sfbd

        run.run(config, workdir)
        summary = sorted(jsonfile.read_json(os.path.join(workdir, online_sfbd.SUMMARY), []),
                         key=lambda r: r["step"])
        rows = [{**tables.metrics_of(r), "round": k, "psnr": r.get("buffer_psnr"),
                 "images_seen": r["images_seen"],
                 "denoise_evaluations": r["denoise_evaluations"],
                 "denoise_gradients": r.get("denoise_gradients", 0)}
                for k, r in enumerate(summary)]
    elif row == "tweediediff":
        run.run(config, workdir)
        result = jsonfile.read_json(os.path.join(workdir, ambient.SUMMARY), {})
        rows = [{**tables.metrics_of(result), "round": None}]
    else:
        run.run(config, workdir)
        summary = jsonfile.read_json(os.path.join(workdir, sfbd.SUMMARY), [])
        # Round 0's PSNR is that of the noisy set itself (the starting point of D^(k)).
        rows = [{**tables.metrics_of(r), "round": r["round"], "images_seen": r["images_seen"],
                 "psnr": None if row == "clean_only"
                 else r.get("denoised_psnr", r.get("noisy_psnr")),
                 "denoise_evaluations": r.get("denoise_evaluations"),
                 "denoise_gradients": r.get("denoise_gradients")}
                for r in sorted(summary, key=lambda r: r["round"])]
    seconds = time.time() - start
    # Where it ran: a same-seed re-run repeats bit for bit only on the same CPU and core count.
    where = f"{tables.machine()} at the end; jax {jax.__version__}"
    for r in rows:
        r.update(row=row, seed=seed, sigma=None if shared_row(row, equal_compute)
                 else config.corrupt.sigma, variant=variant, seconds=seconds,
                 train_images=config.train.total_images, workdir=workdir,
                 compute_dtype=compute_dtype, machine=where)
    tables.record_row(rows, done_path, kept)
    return rows


def with_compute(r: dict) -> dict:
    """Row ``r`` with its compute so far in FPE (``compute_fpe``): training images (seen so far,
    or the row's whole budget) and its denoising passes' evaluations and gradients. Rows
    archived before the passes were counted get them from their config (round k of SFBD: k
    passes over the noisy set)."""
    r = dict(r)
    if r["row"] in ("sfbd", "emdiffusion") and r.get("denoise_evaluations") is None:
        from sfbd_jax.config_checks import noisy_count
        from sfbd_jax.methods import backward

        c = row_config(r["variant"], r["seed"], r["row"], "")
        evaluations, gradients = backward.cost_per_image(c, c.corrupt.sigma)
        passes = (r["round"] or 0) * noisy_count(c)
        r["denoise_evaluations"], r["denoise_gradients"] = passes * evaluations, passes * gradients
    images = r.get("images_seen") or r["train_images"]
    r["compute_fpe"] = (FPE_PER_TRAINING_IMAGE * images + (r.get("denoise_evaluations") or 0)
                        + FPE_PER_GRADIENT * (r.get("denoise_gradients") or 0))
    r["compute_kfpe"] = r["compute_fpe"] / 1000
    return r


def collect(plan: list[tuple[int, str]], out: str, budget_scale: float = 1.0,
            rows: tuple[str, ...] = ROW_ORDER, compute_dtype: str = "float32",
            finished_only: bool = False, equal_compute: bool = False,
            archive: str = "", also_read: tuple[str, ...] = (),
            retrain_lacking: str = "") -> list[dict]:
    """The result rows of ``plan`` × ``rows``, training what is missing (``finished_only``:
    read back the finished rows only, train nothing). Rows are read from ``out`` or, failing
    that, from ``archive`` (and every row finished in ``out`` is kept there), or from the
    read-only archives ``also_read``; those lacking the metric ``retrain_lacking`` are trained
    again (``run_row``)."""
    unknown = set(rows) - set(ROW_ORDER)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; known: {ROW_ORDER}")
    results, seen = [], set()
    for seed, variant in plan:
        for row in (r for r in ROW_ORDER if r in rows):
            key = ((seed, row) if shared_row(row, equal_compute) else (seed, variant, row))
            if key in seen:
                continue
            seen.add(key)
            if finished_only:
                config = row_config(variant, seed, row, out, budget_scale, compute_dtype,
                                    equal_compute)
                finished, source = read_finished(out, archive, also_read, config, seed,
                                                 variant, row, equal_compute)
                results.extend(check_protocol(finished, config, source))
                continue
            print(f"[reproduce] seed {seed} {variant} {row}", flush=True)
            results.extend(run_row(variant, seed, row, out, budget_scale, compute_dtype,
                                   equal_compute, archive, also_read, retrain_lacking))
    return [with_compute(r) for r in results]


# ----- report ---------------------------------------------------------------------------
# (key, header, digits) of the table's metric columns; every evaluation key is in results.json.
COLUMNS = ((("classifier_fd", "classifier FD ↓", 2), ("swd", "sliced W₁ ↓", 4),
            ("noise_sigma", "residual noise σ̂ ↓", 3))
           + tables.NEIGHBOUR_COLUMNS + (("psnr", "PSNR of D^(k) (dB) ↑", 2),
                                         ("compute_kfpe", "compute (10³ FPE)", 0)))
# Metrics added after rows were archived: their columns appear once some row holds them, so a
# table of older rows reads as before.
LATER_METRICS = frozenset({"noise_sigma"})


def shown(columns, results: list[dict]) -> tuple:
    """``columns`` less those of LATER_METRICS that no result holds."""
    return tuple(c for c in columns if c[0] not in LATER_METRICS
                 or any(r.get(c[0]) is not None for r in results))


def table(results: list[dict]) -> str:
    """Markdown: one line per (σ_ζ, row, round), mean ± 95% interval over seeds."""
    sigmas = sorted({r["sigma"] for r in results if r["sigma"] is not None})
    columns = shown(COLUMNS, results)
    lines = ["| σ_ζ | row | " + " | ".join(h for _, h, _ in columns) + " | seeds |",
             "|---|---|" + "---|" * len(columns) + "---|"]

    def add(sigma_label, label, group):
        if not group:
            return
        lines.append(f"| {sigma_label} | {label} | " + " | ".join(tables.cells(group, columns))
                     + f" | {','.join(str(g['seed']) for g in group)} |")

    sigma_free = (("oracle", "(1) EDM on all clean (oracle)"),
                  ("clean_only", "(2) EDM on the 50 clean only"))
    for name, label in sigma_free:  # one run for every σ_ζ
        add("–", label, [r for r in results if r["row"] == name and r["sigma"] is None])
    for sigma in sigmas:
        for name, label in sigma_free:  # at equal compute: SFBD's compute at this σ_ζ
            add(sigma, label, [r for r in results if r["row"] == name and r["sigma"] == sigma])
        add(sigma, "(3) EDM on the noisy set",
            [r for r in results if r["row"] == "noisy" and r["sigma"] == sigma])
        sf = [r for r in results if r["row"] == "sfbd" and r["sigma"] == sigma]
        for k in sorted({r["round"] for r in sf}):
            label = ("(4) SFBD round 0 = pretrained; PSNR of the noisy set" if k == 0
                     else f"(4) SFBD round {k}")
            add(sigma, label, [r for r in sf if r["round"] == k])
        for name, label in (("sfbd_lean", "(4c) SFBD, half the rounds, more training"),
                            ("sfbd_quick", "(4d) SFBD, cheaper backward passes, more training"),
                            ("sfbd_fewer_quick", "(4e) SFBD, 3/4 of the rounds, cheaper "
                                                 "backward passes, more training")):
            variant = [r for r in results if r["row"] == name and r["sigma"] == sigma]
            for k in sorted({r["round"] for r in variant} - {0}):  # 0: SFBD's pretrained model
                add(sigma, f"{label}: round {k}", [r for r in variant if r["round"] == k])
        on = [r for r in results if r["row"] == "online_sfbd" and r["sigma"] == sigma]
        for k in sorted({r["round"] for r in on}):
            label = ("(4b) online SFBD: pretrained" if k == 0 else
                     f"(4b) online SFBD at round {k}'s compute; PSNR of the buffer")
            add(sigma, label, [r for r in on if r["round"] == k])
        add(sigma, "(5) TweedieDiff: ambient loss, σ > 1.155·σ_ζ",
            [r for r in results if r["row"] == "tweediediff" and r["sigma"] == sigma])
        em = [r for r in results if r["row"] == "emdiffusion" and r["sigma"] == sigma]
        for k in sorted({r["round"] for r in em}):
            label = ("(6) EMDiffusion: pretrained" if k == 0 else
                     f"(6) EMDiffusion round {k} (DPS E-step); PSNR of its samples")
            add(sigma, label, [r for r in em if r["round"] == k])
    return "\n".join(lines)


PAIRED_COLUMNS = (("classifier_fd", "classifier FD", 2), ("swd", "sliced W₁", 4),
                  ("noise_sigma", "residual noise σ̂", 3),
                  ("precision", "precision", 3), ("recall", "recall", 3),
                  ("memorised_fraction_train_pixel", "memorised: train set, px", 3),
                  ("psnr", "PSNR (dB)", 2))


def differences(a: dict, b: dict) -> dict:
    """a − b for every PAIRED_COLUMNS key both results hold."""
    return tables.differences(a, b, PAIRED_COLUMNS)


def paired_markdown(title: str, lines: list[str], columns, extra: tuple[str, ...] = ()) -> str:
    """A table of paired differences: header (σ_ζ, ``title``, ``columns``, ``extra``, seeds)
    above ``lines``; empty without lines."""
    if not lines:
        return ""
    headers = ["σ_ζ", title, *(h for _, h, _ in columns), *extra, "seeds"]
    return "\n".join(["| " + " | ".join(headers) + " |",
                      "|" + "---|" * len(headers)] + lines)


def paired_table(results: list[dict]) -> str:
    """Markdown: online SFBD − SFBD at each round's compute, paired by seed (mean ± 95%
    interval of the per-seed differences; bold: the interval excludes 0); empty when no seed
    has both rows."""
    lines, columns = [], shown(PAIRED_COLUMNS, results)
    for sigma in sorted({r["sigma"] for r in results if r["row"] == "online_sfbd"}):
        online, sfbd = ({(r["seed"], r["round"]): r for r in results
                         if r["row"] == row and r["sigma"] == sigma}
                        for row in ("online_sfbd", "sfbd"))
        for k in sorted({k for _, k in online if k}):
            seeds = sorted(s for s, kk in online if kk == k and (s, k) in sfbd)
            if not seeds:
                continue
            diffs = [differences(online[s, k], sfbd[s, k]) for s in seeds]
            lines.append(f"| {sigma} | round {k}'s compute | "
                         + " | ".join(tables.cells(diffs, columns, bold_nonzero=True))
                         + f" | {','.join(map(str, seeds))} |")
    return paired_markdown("online SFBD − SFBD at", lines, columns)


FINAL_LABELS = {"oracle": "(1) oracle", "clean_only": "(2) 50 clean only",
                "noisy": "(3) EDM on noisy", "sfbd_lean": "(4c) SFBD, half the rounds",
                "sfbd_quick": "(4d) SFBD, cheaper backward passes",
                "sfbd_fewer_quick": "(4e) SFBD, 3/4 of the rounds, cheaper passes",
                "online_sfbd": "(4b) online SFBD",
                "tweediediff": "(5) TweedieDiff", "emdiffusion": "(6) EMDiffusion"}


def final_rows(results: list[dict], row: str, sigma) -> dict:
    """{seed: the row's result at the end of its budget} (the last round of an iterative row);
    rows run once for every σ_ζ (their ``sigma`` is None) for any ``sigma``."""
    out = {}
    for r in results:
        if r["row"] == row and r["sigma"] in (sigma, None):
            if r["seed"] not in out or (r["round"] or 0) > (out[r["seed"]]["round"] or 0):
                out[r["seed"]] = r
    return out


def against_sfbd_table(results: list[dict]) -> str:
    """Markdown: every other row at the end of its budget − SFBD after its last round, paired
    by seed (mean ± 95% interval of the per-seed differences; an interval that excludes 0 is a
    difference the seeds support, in bold). Empty when no seed has SFBD and another row."""
    lines, columns = [], shown(PAIRED_COLUMNS, results)
    for sigma in sorted({r["sigma"] for r in results if r["row"] == "sfbd"}):
        sfbd = final_rows(results, "sfbd", sigma)
        for row, label in FINAL_LABELS.items():
            other = final_rows(results, row, sigma)
            seeds = sorted(set(other) & set(sfbd))
            if not seeds:
                continue
            diffs = [differences(other[s], sfbd[s]) for s in seeds]
            ratio = np.mean([other[s]["compute_fpe"] / sfbd[s]["compute_fpe"] for s in seeds])
            lines.append(f"| {sigma} | {label} | "
                         + " | ".join(tables.cells(diffs, columns, bold_nonzero=True))
                         + f" | {ratio:.2f} | {','.join(map(str, seeds))} |")
    return paired_markdown("row − SFBD (last round)", lines, columns, ("compute ÷ SFBD's",))


def final_results(results: list[dict]) -> list[dict]:
    """The results a reader compares: every row at the end of its budget (its last round at
    each σ_ζ), and for SFBD's reallocations also their first round (their first model trained
    on a denoised set, where the extra training shows before the rounds add up)."""
    last = {}
    for r in results:
        key = (r["row"], r["sigma"])
        last[key] = max(last.get(key, 0), r["round"] or 0)
    return [r for r in results if (r["round"] or 0) == last[r["row"], r["sigma"]]
            or (r["row"] in ALLOCATION_ROWS and r["round"] == 1)]


def final_table(results: list[dict]) -> str:
    """Markdown: ``table`` of the ``final_results``, then ``against_sfbd_table`` — the
    summary a write-up quotes, reproducible from the archive."""
    text = table(final_results(results))
    against = against_sfbd_table(results)
    return text + ("\n\n" + against if against else "")


def plot_metrics(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigmas = sorted({r["sigma"] for r in results if r["sigma"] is not None})
    metrics = shown((("classifier_fd", "classifier-feature FD"), ("swd", "sliced W₁ (pixels)"),
                     ("noise_sigma", "residual noise σ̂ (pixels)"),
                     ("memorised_fraction_train_pixel", "memorised fraction (train set, px)"),
                     ("recall", "recall (classifier features)"),
                     ("psnr", "PSNR of D^(k) vs clean (dB)")), results)
    fig, axes = plt.subplots(len(sigmas), len(metrics), figsize=(4.3 * len(metrics),
                                                                 3.6 * len(sigmas)),
                             squeeze=False)
    for i, sigma in enumerate(sigmas):
        for j, (key, title) in enumerate(metrics):
            ax = axes[i, j]
            # One colour per method, one thin line per seed (labelled once).
            for method, marker, color, name in (("sfbd", "o-", "tab:blue", "SFBD"),
                                                ("sfbd_lean", "v-", "tab:cyan",
                                                 "SFBD, half the rounds"),
                                                ("sfbd_quick", "<-", "tab:purple",
                                                 "SFBD, cheaper backward passes"),
                                                ("sfbd_fewer_quick", ">-", "tab:brown",
                                                 "SFBD, 3/4 rounds, cheaper passes"),
                                                ("online_sfbd", "s--", "tab:orange",
                                                 "online SFBD"),
                                                ("emdiffusion", "^:", "tab:green",
                                                 "EMDiffusion")):
                sf = [r for r in results if r["row"] == method and r["sigma"] == sigma]
                # The seeds that hold this metric (one added later may lack it on some).
                seeds = sorted({r["seed"] for r in sf if r.get(key) is not None})
                for seed in seeds:
                    pts = sorted((r["compute_kfpe"], r.get(key)) for r in sf
                                 if r["seed"] == seed and r.get(key) is not None)
                    ax.plot(*zip(*pts, strict=True), marker, color=color, alpha=0.75,
                            linewidth=1, markersize=4,
                            label=f"{name} (seed{'s' * (len(seeds) > 1)} "
                                  f"{','.join(map(str, seeds))})"
                            if seed == seeds[0] else None)
            if key != "psnr":
                for row, style in (("oracle", "g--"), ("clean_only", "r:"), ("noisy", "k-."),
                                   ("tweediediff", "m-")):
                    group = [r for r in results if r["row"] == row and key in r
                             and r["sigma"] in (sigma, None)]
                    if group:  # its level, and a point (mean ± 95% interval) at its compute
                        mean, ci = tables.mean_ci([r[key] for r in group])
                        ax.axhline(mean, color=style[0], linestyle=style[1:], linewidth=0.8,
                                   alpha=0.6)
                        ax.errorbar(np.mean([r["compute_kfpe"] for r in group]), mean,
                                    yerr=None if np.isnan(ci) else ci, fmt="D",
                                    color=style[0], markersize=5, capsize=3,
                                    label={"oracle": "oracle (all clean)",
                                           "clean_only": "50 clean only",
                                           "noisy": "EDM on noisy",
                                           "tweediediff": "TweedieDiff"}[row])
            ax.set_title(f"σ_ζ = {sigma}: {title}")
            ax.set_xlabel("compute so far (10³ forward-pass equivalents)")
            ax.grid(alpha=0.3)
            if key == "classifier_fd":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(results: list[dict], path: str) -> None:
    """Sample grids of every row (first seed): oracle, clean-only, noisy, SFBD per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    seed = min(r["seed"] for r in results)
    panels = []
    for r in results:
        if r["seed"] != seed:
            continue
        if r["row"] in ("oracle", "noisy", "tweediediff"):
            png = os.path.join(r["workdir"], "samples", "final.png")
            label = {"oracle": "oracle", "noisy": f"EDM on noisy σ={r['sigma']}",
                     "tweediediff": f"TweedieDiff σ={r['sigma']}"}[r["row"]]
        else:
            png = os.path.join(r["workdir"], "samples", f"round{r['round']}.png")
            name = {"sfbd": "SFBD", "sfbd_lean": "SFBD (half the rounds)",
                    "sfbd_quick": "SFBD (cheaper backward)",
                    "sfbd_fewer_quick": "SFBD (3/4 rounds, cheaper backward)",
                    "emdiffusion": "EMDiffusion",
                    "online_sfbd": "online SFBD"}.get(r["row"])
            label = ("50 clean only" if r["row"] == "clean_only"
                     else f"{name} σ={r['sigma']} round {r['round']}")
        if os.path.exists(png) and label not in [p[0] for p in panels]:
            panels.append((label, np.asarray(Image.open(png))))
    if not panels:  # e.g. only online SFBD rows were asked for: no grid of samples to show
        return
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, img) in zip(axes.flat, panels, strict=False):
        ax.imshow(img, cmap="gray")
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_triptych(results: list[dict], sigma: float, path: str, count: int = 8) -> None:
    """clean original | noisy | D^(1) … D^(K) for ``count`` noisy images spread evenly over
    the set (MNIST-5k is sorted by class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sfbd_jax.data import eval_only
    from sfbd_jax.data.prepared import PreparedDataset

    sf = [r for r in results if r["row"] == "sfbd" and r["sigma"] == sigma]
    seed = min(r["seed"] for r in sf)
    workdir = next(r["workdir"] for r in sf if r["seed"] == seed)
    data_dir = os.path.join(os.path.dirname(workdir), "data")
    if not os.path.isdir(os.path.join(workdir, "denoised")):  # rows read back from an archive
        logging.info("No triptych for σ_ζ = %s: %s has no denoised sets.", sigma, workdir)
        return
    originals = eval_only.load_clean_originals(data_dir)
    pick = np.linspace(0, len(originals) - 1, count).astype(int)
    columns = [("clean", originals[pick]),
               ("noisy", np.asarray(PreparedDataset(data_dir).noisy()[0].images)[pick])]
    for k in sorted({r["round"] for r in sf if r["round"]}):
        columns.append((f"D^({k})", _read_denoised(os.path.join(workdir, "denoised",
                                                                f"round_{k}"))[pick]))
    fig, axes = plt.subplots(count, len(columns), figsize=(1.3 * len(columns), 1.3 * count),
                             squeeze=False)
    for j, (label, imgs) in enumerate(columns):
        for i in range(count):
            ax = axes[i, j]
            ax.imshow(np.clip(imgs[i, ..., 0], -1, 1), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
    fig.suptitle(f"σ_ζ = {sigma}, seed {seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_denoised(folder: str) -> np.ndarray:
    """D^(k) in the order of the noisy set, from its checksummed shards."""
    from sfbd_jax.data import shards
    from sfbd_jax.methods import backward
    from sfbd_jax.utils import jsonfile

    progress = jsonfile.read_json(os.path.join(folder, backward.PROGRESS), None)
    return shards.read_all(folder, sorted(progress["shards"], key=lambda e: e["start"]))


def report(results: list[dict], out: str) -> str:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    for extra in (paired_table(results), against_sfbd_table(results)):
        if extra:
            text += "\n\n" + extra
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "table_final.md"), "w") as f:
        f.write(final_table(results) + "\n")
    if any(r["sigma"] is not None for r in results):  # rows that depend on σ_ζ
        plot_metrics(results, os.path.join(out, "mnist_metrics_vs_round.png"))
    if results:
        plot_samples(results, os.path.join(out, "mnist_samples.png"))
    for sigma in sorted({r["sigma"] for r in results if r["row"] == "sfbd"}):
        plot_triptych(results, sigma, os.path.join(out, f"mnist_triptych_sigma{sigma}.png"))
    return text


def parse_plan(spec: str) -> list[tuple[int, str]]:
    plan = []
    for item in spec.split(","):
        seed, _, variant = item.partition(":")
        plan.append((int(seed), variant))
    return plan


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (runs, results, figures)")
    parser.add_argument("--plan", default="0:sigma0.2,0:sigma0.59,1:sigma0.2",
                        help="seed:variant pairs of configs/reproduce_mnist.py")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets (the test suite)")
    parser.add_argument("--budget_scale", type=float, default=1.0,
                        help="multiply every training length (use a new --out)")
    parser.add_argument("--rows", default=",".join(ROW_ORDER),
                        help=f"comma-separated rows to run, of {','.join(ROW_ORDER)}")
    parser.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"],
                        help="config.model.compute_dtype of every row (use a new --out)")
    parser.add_argument("--equal_compute", action="store_true",
                        help="rows without a denoising pass train for SFBD's whole compute "
                             "(use a new --out)")
    parser.add_argument("--finished_only", action="store_true",
                        help="tabulate the rows already finished; train nothing")
    parser.add_argument("--archive", default="",
                        help="keep every finished row's result in this folder (to commit) "
                             "and read rows missing from --out there")
    parser.add_argument("--also_read", action="append", default=[],
                        help="a read-only archive of rows to read when --out and --archive "
                             "lack them (repeatable), e.g. the SFBD rows, which --equal_compute "
                             "leaves as they are, from the main archive")
    parser.add_argument("--retrain_lacking", default="",
                        help="train a finished row again when its results lack this metric "
                             "(e.g. noise_sigma, added after it ran); its record is replaced")
    args = parser.parse_args(argv)
    plan = [(0, "smoke")] if args.smoke else parse_plan(args.plan)
    devices.configure_cpu_devices(0)
    logging.set_verbosity(logging.INFO)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    text = report(collect(plan, out, args.budget_scale, rows, args.compute_dtype,
                          args.finished_only, args.equal_compute,
                          os.path.abspath(args.archive) if args.archive else "",
                          tuple(os.path.abspath(a) for a in args.also_read),
                          args.retrain_lacking), out)
    print(text)
    print(f"[reproduce] done in {time.time() - start:.0f} s; figures and results in {out}")
    return text


if __name__ == "__main__":
    main()
