"""The reproduction scripts end to end in smoke mode, and evaluating their checkpoints from
the command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gmm_convergence  # noqa: E402
import reproduce_mnist  # noqa: E402

from configs import reproduce_mnist as configs_reproduce  # noqa: E402
from sfbd_jax.diffusion import sampler  # noqa: E402
from sfbd_jax.methods import backward  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reproduce"))
    archive = str(tmp_path_factory.mktemp("archive"))
    text = reproduce_mnist.main(["--out", out, "--smoke", "--archive", archive])
    return out, text, archive


@pytest.mark.slow
def test_reproduction_smoke_writes_every_row_table_and_figure(smoke_run):
    out, text, archive = smoke_run
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    rows = {(r["row"], r["round"]) for r in results}
    assert rows == {("oracle", None), ("clean_only", 0), ("noisy", None), ("sfbd", 0),
                    ("sfbd", 1), ("sfbd", 2), ("sfbd_lean", 0), ("sfbd_lean", 1),
                    ("sfbd_quick", 0), ("sfbd_quick", 1), ("sfbd_quick", 2),
                    ("sfbd_fewer_quick", 0), ("sfbd_fewer_quick", 1),
                    ("online_sfbd", 0), ("online_sfbd", 1),
                    ("online_sfbd", 2), ("tweediediff", None), ("emdiffusion", 0),
                    ("emdiffusion", 1)}
    budgets = {r["train_images"] for r in results
               if r["row"] not in reproduce_mnist.ALLOCATION_ROWS}
    assert len(budgets) == 1  # the same training budget for every row but SFBD's reallocations
    for r in results:
        assert np.isfinite(r["classifier_fd"]) and r["swd"] > 0
        assert 0 <= r["memorised_fraction_train_pixel"] <= 1
        assert np.isfinite(r["d1_ratio_train_features"]) and 0 <= r["coverage"] <= 1
        assert r["noise_sigma"] >= 0 and r["noise_sigma_reference"] == 0.0  # clean MNIST
    sfbd_dir = next(r["workdir"] for r in results if r["row"] == "sfbd")
    assert os.path.exists(os.path.join(sfbd_dir, "eval", "copies_round2.png"))
    assert "memorised: train set, px" in text and "residual noise σ̂" in text
    sfbd_psnr = [r["psnr"] for r in results if r["row"] == "sfbd"]
    assert all(np.isfinite(sfbd_psnr))
    # Online SFBD at SFBD's compute: at each evaluation point the same training images and
    # denoising evaluations as SFBD after that round.
    sfbd_images = {r["round"]: r["images_seen"] for r in results if r["row"] == "sfbd"}
    for r in (r for r in results if r["row"] == "online_sfbd"):
        assert r["images_seen"] == sfbd_images[r["round"]]
        c = reproduce_mnist.row_config("smoke", 0, "online_sfbd", out)
        per_image = sampler.num_evaluations(sampler.sigmas_from_level(
            0.2, c.sfbd.backward_num_steps, c.sampler.sigma_min, c.sampler.sigma_max,
            c.sampler.rho))
        assert r["denoise_evaluations"] == r["round"] * 350 * per_image
        assert r["round"] == 0 or np.isfinite(r["psnr"])
    # EMDiffusion at SFBD's compute: the same training images; its E-step (DPS, every level
    # an evaluation and its gradient) costs no more forward-pass equivalents than SFBD's
    # backward passes.
    final = {r["row"]: r for r in results if r["round"] in (None, 1, 2)
             and (r["row"] != "sfbd" or r["round"] == 2)}
    em = final["emdiffusion"]
    c = reproduce_mnist.row_config("smoke", 0, "emdiffusion", out)
    assert em["denoise_gradients"] == em["denoise_evaluations"] == 350 * c.sfbd.dps_num_steps
    assert em["images_seen"] == final["sfbd"]["images_seen"]
    assert em["compute_fpe"] <= final["sfbd"]["compute_fpe"]
    assert final["oracle"]["compute_fpe"] == 3 * final["oracle"]["train_images"]
    # SFBD with half the rounds: its one backward pass and more training images, at SFBD's
    # compute to within one batch of training images.
    lean = final["sfbd_lean"]
    assert lean["denoise_evaluations"] == final["sfbd"]["denoise_evaluations"] // 2
    assert lean["images_seen"] > final["sfbd"]["images_seen"]
    assert 0 <= final["sfbd"]["compute_fpe"] - lean["compute_fpe"] < 3 * 32
    # SFBD with cheaper backward passes: as many passes, 5 evaluations each instead of 7, the
    # difference paid as training images (to within one batch a round).
    quick = final["sfbd_quick"]
    assert quick["denoise_evaluations"] == 2 * 350 * 5
    assert final["sfbd"]["denoise_evaluations"] == 2 * 350 * 7
    assert quick["images_seen"] > final["sfbd"]["images_seen"]
    assert 0 <= final["sfbd"]["compute_fpe"] - quick["compute_fpe"] < 3 * 32 * 2
    assert np.isfinite(quick["psnr"])
    # 3/4 of the rounds (here 1 of 2) on the cheaper grid, the rest paid as training images.
    fewer = final["sfbd_fewer_quick"]
    assert fewer["denoise_evaluations"] == 350 * 5
    assert fewer["images_seen"] > lean["images_seen"]
    assert 0 <= final["sfbd"]["compute_fpe"] - fewer["compute_fpe"] < 3 * 32
    assert np.isfinite(em["psnr"])
    for label in ("(1) EDM on all clean", "(2) EDM on the 50 clean only",
                  "(3) EDM on the noisy set", "(4) SFBD round 2",
                  "(4b) online SFBD at round 2's compute", "(5) TweedieDiff",
                  "| 0.2 | round 2's compute |", "(6) EMDiffusion round 1",
                  "| 0.2 | (6) EMDiffusion |", "compute ÷ SFBD's",
                  "(4c) SFBD, half the rounds, more training: round 1",
                  "| 0.2 | (4c) SFBD, half the rounds |",
                  "(4d) SFBD, cheaper backward passes, more training: round 2",
                  "| 0.2 | (4d) SFBD, cheaper backward passes |",
                  "(4e) SFBD, 3/4 of the rounds, cheaper backward passes, more training: round 1",
                  "| 0.2 | (4e) SFBD, 3/4 of the rounds, cheaper passes |"):
        assert label in text
    with open(os.path.join(out, "table_final.md")) as f:
        final = f.read()
    assert "(4) SFBD round 2" in final and "(4) SFBD round 1" not in final
    assert "| 0.2 | (5) TweedieDiff |" in final and "(6) EMDiffusion round 1" in final
    for name in ("mnist_metrics_vs_round.png", "mnist_samples.png",
                 "mnist_triptych_sigma0.2.png"):
        with Image.open(os.path.join(out, name)) as img:
            assert img.size[0] > 200 and img.size[1] > 200
    # Re-running finds every row done: nothing is trained again, the table is the same.
    assert reproduce_mnist.main(["--out", out, "--smoke"]) == text
    assert reproduce_mnist.main(["--out", out, "--smoke", "--finished_only"]) == text
    # Every finished row was kept in the archive (its result only, a few kB), and the archive
    # alone (what is committed) rebuilds the same table on a machine without the runs.
    kept = [os.path.relpath(d, archive) for d, _, files in os.walk(archive)
            if "reproduce_row.json" in files]
    assert len(kept) == len(reproduce_mnist.ROW_ORDER) == 10
    assert os.path.join("seed0", "smoke", "sfbd") in kept
    assert not any(name.endswith((".npy", ".png")) or name == "checkpoints"
                   for _, dirs, files in os.walk(archive) for name in dirs + files)
    elsewhere = os.path.join(out, "elsewhere")
    assert reproduce_mnist.main(["--out", elsewhere, "--smoke", "--finished_only",
                                 "--archive", archive]) == text
    # Rows finished before an archive was named are copied into it when read.
    late = os.path.join(out, "late_archive")
    reproduce_mnist.main(["--out", out, "--smoke", "--finished_only", "--archive", late])
    assert reproduce_mnist.main(["--out", late, "--smoke", "--finished_only"]) == text
    # Rows of another protocol are refused, not mixed into the table.
    with pytest.raises(ValueError, match="use a new --out"):
        reproduce_mnist.main(["--out", out, "--smoke", "--finished_only", "--equal_compute"])


@pytest.mark.slow
def test_dps_calibration_on_the_smoke_runs_pretrained_model(smoke_run):
    import dps_calibration

    out, _, _ = smoke_run
    args = ["--out", out, "--variant", "smoke", "--count", "8", "--grid",
            "normalized:4:1,likelihood:3:0.5"]
    rows = dps_calibration.main(args)
    assert [(r["backward"], r["levels"]) for r in rows] == [("ode", None), ("dps", 4),
                                                            ("dps", 3)]
    assert [r["forward_equivalents_per_image"] for r in rows[1:]] == [12, 9]
    assert all(np.isfinite(r["psnr"]) and r["discrepancy_ratio"] > 0 for r in rows)
    assert dps_calibration.main(args) == []  # every setting is recorded: nothing redone


def test_equal_compute_gives_training_only_rows_sfbds_whole_compute():
    sfbd = reproduce_mnist.row_config("sigma0.2", 0, "sfbd", "/tmp/x")
    oracle = reproduce_mnist.row_config("sigma0.2", 0, "oracle", "/tmp/x", equal_compute=True)
    # 13,440 training images (3 FPE each) + 4 backward passes × 4,950 images × 7 evaluations.
    assert reproduce_mnist.sfbd_compute(sfbd) == 3 * 13_440 + 4 * 4_950 * 7
    assert oracle.train.total_images == (3 * 13_440 + 4 * 4_950 * 7) // 3 // 64 * 64
    assert sfbd.train.total_images == 13_440  # rows that denoise keep SFBD's training images
    em = reproduce_mnist.row_config("sigma0.2", 0, "emdiffusion", "/tmp/x", equal_compute=True)
    assert em.train.total_images == 13_440
    assert (em.sfbd.rounds, em.sfbd.dps_num_steps, em.sfbd.backward) == (1, 9, "dps")
    # SFBD with half the rounds: 2 backward passes, the two it skips (2 × 4,950 × 7 FPE) paid
    # as training images, so its compute is SFBD's to within one batch of training images.
    lean = reproduce_mnist.row_config("sigma0.2", 0, "sfbd_lean", "/tmp/x", equal_compute=True)
    assert lean.sfbd.rounds == 2 and lean.sfbd.pretrain_images == sfbd.sfbd.pretrain_images
    assert lean.train.total_images == 3_200 + 2 * lean.sfbd.images_per_round
    assert 0 <= reproduce_mnist.sfbd_compute(sfbd) - reproduce_mnist.sfbd_compute(lean) < 3 * 64
    # SFBD with cheaper backward passes: 4 passes of 5 evaluations instead of 7 (σ_ζ = 0.2) or
    # 9 (σ_ζ = 0.59), the evaluations saved paid as training images, to within a batch a round.
    for variant, evaluations in (("sigma0.2", 7), ("sigma0.59", 9)):
        full = reproduce_mnist.row_config(variant, 0, "sfbd", "/tmp/x")
        quick = reproduce_mnist.row_config(variant, 0, "sfbd_quick", "/tmp/x", True)
        assert backward.cost_per_image(full, full.corrupt.sigma)[0] == evaluations
        assert backward.cost_per_image(quick, quick.corrupt.sigma)[0] == 5
        assert quick.sfbd.rounds == 4 and quick.sfbd.pretrain_images == 3_200
        assert quick.train.total_images == 3_200 + 4 * quick.sfbd.images_per_round
        assert quick.sfbd.images_per_round > full.sfbd.images_per_round
        gap = reproduce_mnist.sfbd_compute(full) - reproduce_mnist.sfbd_compute(quick)
        assert 0 <= gap < 3 * 64 * 4
    # 3/4 of the rounds on the cheaper grid: 3 passes of 5 evaluations; at σ_ζ = 0.2 the
    # 4 × 7 − 3 × 5 = 13 evaluations per noisy image saved buy 21,450 training images,
    # 10,560 a round in whole batches.
    for variant in ("sigma0.2", "sigma0.59"):
        full = reproduce_mnist.row_config(variant, 0, "sfbd", "/tmp/x")
        fewer = reproduce_mnist.row_config(variant, 0, "sfbd_fewer_quick", "/tmp/x", True)
        assert fewer.sfbd.rounds == 3
        assert backward.cost_per_image(fewer, fewer.corrupt.sigma)[0] == 5
        assert fewer.train.total_images == 3_200 + 3 * fewer.sfbd.images_per_round
        gap = reproduce_mnist.sfbd_compute(full) - reproduce_mnist.sfbd_compute(fewer)
        assert 0 <= gap < 3 * 64 * 3
    fewer = reproduce_mnist.row_config("sigma0.2", 0, "sfbd_fewer_quick", "/tmp/x", True)
    assert fewer.sfbd.images_per_round == 10_560
    # A reallocation that would spend more on denoising than SFBD does is refused.
    dear = reproduce_mnist.row_config("sigma0.2", 0, "sfbd", "/tmp/x")
    with pytest.raises(ValueError, match="cost more than SFBD's 4"):
        configs_reproduce.reallocate(dear, 5, dear.sfbd.backward_num_steps)
    cheap = reproduce_mnist.row_config("sigma0.2", 0, "sfbd", "/tmp/x")
    cheap.sfbd.backward_num_steps = 6  # already as cheap as the quick grid: refused
    with pytest.raises(ValueError, match="not fewer than SFBD's 5"):
        configs_reproduce.sfbd_quick(cheap)
    # SFBD's compute grows with σ_ζ, so at equal compute the rows that never see the noisy set
    # are one run per σ_ζ (its own folder), tabulated under that σ_ζ, not once for all.
    high = reproduce_mnist.row_config("sigma0.59", 0, "oracle", "/tmp/x", equal_compute=True)
    assert high.train.total_images > oracle.train.total_images
    workdirs = {reproduce_mnist.row_workdir("/tmp/x", 0, v, row, equal_compute)
                for v in ("sigma0.2", "sigma0.59") for row in ("oracle", "clean_only")
                for equal_compute in (False, True)}
    assert workdirs == {"/tmp/x/seed0/oracle", "/tmp/x/seed0/clean_only",
                        "/tmp/x/seed0/sigma0.2/oracle", "/tmp/x/seed0/sigma0.59/oracle",
                        "/tmp/x/seed0/sigma0.2/clean_only", "/tmp/x/seed0/sigma0.59/clean_only"}
    row = {"classifier_fd": 1.0, "swd": 0.1, "round": None, "seed": 0, "compute_kfpe": 1.0}
    text = reproduce_mnist.table([{**row, "row": "oracle", "sigma": 0.2},
                                  {**row, "row": "oracle", "sigma": 0.59, "classifier_fd": 2.0},
                                  {**row, "row": "noisy", "sigma": 0.59}])
    assert [line.split(" | ")[:3] for line in text.splitlines()[2:]] == [
        ["| 0.2", "(1) EDM on all clean (oracle)", "1.00"],
        ["| 0.59", "(1) EDM on all clean (oracle)", "2.00"],
        ["| 0.59", "(3) EDM on the noisy set", "1.00"]]


def test_final_table_keeps_each_rows_end_and_bolds_the_differences_the_seeds_support():
    """table_final.md: each row at the end of its budget (SFBD's reallocations also after
    their first round), then the differences to SFBD paired by seed, bold exactly where the
    95% interval excludes 0."""
    results = []
    for seed in range(3):
        for k in range(5):
            results.append({"row": "sfbd", "sigma": 0.2, "round": k, "seed": seed,
                            "classifier_fd": 5.0 - k + 0.1 * seed, "swd": 0.1,
                            "compute_fpe": 100 * k})
        for k in range(3):
            results.append({"row": "sfbd_lean", "sigma": 0.2, "round": k, "seed": seed,
                            "classifier_fd": 5.0 + k + 0.1 * seed,
                            "swd": 0.1 + 0.01 * (seed - 1),
                            "compute_fpe": 200 * k})
        results.append({"row": "oracle", "sigma": 0.2, "round": None, "seed": seed,
                        "classifier_fd": 0.5 + 0.11 * seed, "swd": 0.05, "compute_fpe": 400})
    kept = {(r["row"], r["round"]) for r in reproduce_mnist.final_results(results)}
    assert kept == {("sfbd", 4), ("sfbd_lean", 1), ("sfbd_lean", 2), ("oracle", None)}
    text = reproduce_mnist.final_table(results)
    labels = [line.split(" | ")[1] for line in text.splitlines()
              if line.startswith("| 0.2 |")]
    assert labels == ["(1) EDM on all clean (oracle)", "(4) SFBD round 4",
                      "(4c) SFBD, half the rounds, more training: round 1",
                      "(4c) SFBD, half the rounds, more training: round 2",
                      "(1) oracle", "(4c) SFBD, half the rounds"]
    starts = ("| 0.2 | (1) oracle |", "| 0.2 | (4c) SFBD, half the rounds |")
    oracle, lean = (line.split(" | ") for line in text.splitlines() if line.startswith(starts))
    # FD − SFBD's round 4 (1 + 0.1·seed): −0.50, −0.49, −0.48, t-interval ± 4.30·0.01/√3.
    assert oracle[2] == "**-0.49 ± 0.02**"
    assert oracle[3] == "**-0.0500 ± 0.0000**"  # sliced W₁: 0.05 − 0.1 on every seed
    assert lean[2] == "**6.00 ± 0.00**"  # round 2: FD 7 + 0.1·seed
    assert lean[3] == "0.0000 ± 0.0248"  # −0.01, 0, +0.01: the interval spans 0, plain
    assert lean[-2] == "1.00"  # compute ÷ SFBD's: 400 / 400
    assert "residual noise" not in text  # no record holds it: the tables read as before

    # A later metric: its column appears once some row holds it ('–' where a row lacks it),
    # in the table and among the paired differences.
    for r in results:
        if r["row"] == "oracle" or (r["row"] == "sfbd" and r["seed"] < 2):
            r["noise_sigma"] = 0.01 if r["row"] == "oracle" else 0.05 + 0.01 * r["seed"]
    text = reproduce_mnist.final_table(results)
    lines = text.splitlines()
    assert lines[0].split(" | ")[4] == "residual noise σ̂ ↓"
    by_label = {line.split(" | ")[1]: line.split(" | ") for line in lines if " | " in line}
    assert by_label["(1) EDM on all clean (oracle)"][4] == "0.010 ± 0.000"
    # Seeds 0, 1 of 3: ± 12.71·0.01/√2, and the cell says it covers 2 of the row's 3 seeds.
    assert by_label["(4) SFBD round 4"][4] == "0.055 ± 0.064 (2 of 3)"
    assert by_label["(4c) SFBD, half the rounds, more training: round 2"][4] == "–"
    assert "| row − SFBD (last round) | classifier FD | sliced W₁ | residual noise σ̂ |" in text
    assert by_label["(1) oracle"][4] == "-0.045 ± 0.064 (2 of 3)"  # spans 0: plain
    assert by_label["(4c) SFBD, half the rounds"][4] == "–"


def test_equal_compute_table_reads_the_rows_it_leaves_unchanged_from_another_archive(tmp_path):
    """--also_read: SFBD's rows (the same budget under --equal_compute) come from a read-only
    archive; a row there of another protocol (noisy at the table's budget) is passed over, not
    mixed in and not refused; nothing is written to the read-only archive."""
    from sfbd_jax.utils import jsonfile

    main_archive, out = str(tmp_path / "main"), str(tmp_path / "eq")
    record = {"classifier_fd": 5.0, "swd": 0.1, "seed": 0, "variant": "smoke", "sigma": 0.2,
              "denoise_evaluations": 0, "denoise_gradients": 0, "workdir": ""}

    def keep(folder, row, train_images, **extra):
        path = reproduce_mnist.row_record(folder, 0, "smoke", row, equal_compute=True)
        jsonfile.write_json(path, [{**record, "row": row, "train_images": train_images,
                                    **extra}])

    sfbd = reproduce_mnist.row_config("smoke", 0, "sfbd", out, equal_compute=True)
    noisy = reproduce_mnist.row_config("smoke", 0, "noisy", out, equal_compute=True)
    assert noisy.train.total_images > sfbd.train.total_images
    keep(main_archive, "sfbd", sfbd.train.total_images, round=2, images_seen=0)
    keep(main_archive, "noisy", sfbd.train.total_images, round=None)  # the table's budget
    before = sorted(os.walk(main_archive))

    def collect(also_read):
        return reproduce_mnist.collect([(0, "smoke")], out, rows=("noisy", "sfbd"),
                                       finished_only=True, equal_compute=True,
                                       also_read=also_read)

    assert collect(()) == []
    assert [(r["row"], r["round"]) for r in collect((main_archive,))] == [("sfbd", 2)]
    keep(out, "noisy", noisy.train.total_images, round=None, classifier_fd=4.0)
    rows = collect((main_archive,))
    assert [(r["row"], r["classifier_fd"]) for r in rows] == [("noisy", 4.0), ("sfbd", 5.0)]
    assert sorted(os.walk(main_archive)) == before


def test_retrain_lacking_trains_again_only_the_rows_without_the_metric(tmp_path, monkeypatch):
    """--retrain_lacking noise_sigma: an archived row without the metric is trained again and
    its record replaced in the archive (a read-only archive is left alone); a row that has it
    is read back; without the flag every finished row is read back."""
    from sfbd_jax import run as run_lib
    from sfbd_jax.methods import ambient
    from sfbd_jax.utils import jsonfile

    archive, read_only, out = (str(tmp_path / name) for name in ("archive", "main", "out"))
    config = reproduce_mnist.row_config("smoke", 0, "tweediediff", out)
    old = {"classifier_fd": 5.0, "swd": 0.1, "round": None, "row": "tweediediff", "seed": 0,
           "variant": "smoke", "sigma": 0.2, "train_images": config.train.total_images,
           "workdir": ""}
    trained = []

    def fake_run(cfg, workdir):  # the row's training and evaluation, instantly
        trained.append(workdir)
        jsonfile.write_json(os.path.join(workdir, ambient.SUMMARY),
                            {"classifier_fd": 5.0, "swd": 0.1, "noise_sigma": 0.02})

    monkeypatch.setattr(run_lib, "run", fake_run)

    def collect(**kwargs):
        return reproduce_mnist.collect([(0, "smoke")], out, rows=("tweediediff",),
                                       archive=archive, **kwargs)

    for folder in (read_only, archive):
        jsonfile.write_json(reproduce_mnist.row_record(folder, 0, "smoke", "tweediediff"),
                            [old])
    assert [r.get("noise_sigma") for r in collect(also_read=(read_only,))] == [None]
    assert trained == []  # finished rows are read back
    rows = collect(retrain_lacking="noise_sigma")
    assert len(trained) == 1 and [r["noise_sigma"] for r in rows] == [0.02]
    kept = jsonfile.read_json(reproduce_mnist.row_record(archive, 0, "smoke", "tweediediff"),
                              [])
    assert kept[0]["noise_sigma"] == 0.02 and kept[0]["classifier_fd"] == 5.0
    assert collect(retrain_lacking="noise_sigma")[0]["noise_sigma"] == 0.02
    assert len(trained) == 1  # it has the metric now: read back
    # A row only in a read-only archive: trained again here, the read-only copy unchanged.
    os.remove(reproduce_mnist.row_record(archive, 0, "smoke", "tweediediff"))
    os.remove(reproduce_mnist.row_record(out, 0, "smoke", "tweediediff"))
    rows = collect(also_read=(read_only,), retrain_lacking="noise_sigma")
    assert len(trained) == 2 and rows[0]["noise_sigma"] == 0.02
    untouched = jsonfile.read_json(reproduce_mnist.row_record(read_only, 0, "smoke",
                                                              "tweediediff"), [])
    assert untouched == [old]


@pytest.mark.slow
def test_evaluate_command_on_a_reproduction_checkpoint(smoke_run):
    """``python -m sfbd_jax.evaluate`` on the oracle run: the same samples (fixed key) give the
    metric the reproduction recorded; bad --checkpoint values give clear errors."""
    from sfbd_jax.run import run_evaluation

    out, _, _ = smoke_run
    config = reproduce_mnist.row_config("smoke", 0, "oracle", out)
    workdir = reproduce_mnist.row_workdir(out, 0, "smoke", "oracle")
    with open(os.path.join(workdir, "reproduce_row.json")) as f:
        recorded = json.load(f)[0]
    step = int(sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int)[-1])
    proc = subprocess.run(  # the row's config: the smoke variant as row_config changes it
        [sys.executable, "-m", "sfbd_jax.evaluate",
         f"--config={ROOT}/configs/reproduce_mnist.py:smoke", f"--workdir={workdir}",
         f"--checkpoint=step:{step}", "--config.num_cpu_devices=2", "--config.mode=edm",
         f"--config.eval.cache_dir={out}/cache"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "eval", f"step{step}.json")) as f:
        result = json.load(f)
    assert result["classifier_fd"] == pytest.approx(recorded["classifier_fd"], rel=1e-6)
    for key in ("memorised_fraction_train_pixel", "d1_ratio_train_features", "recall"):
        assert result[key] == pytest.approx(recorded[key], rel=1e-6), key
    # The oracle trained on the whole clean set: its training set is the reference.
    assert result["train_count"] == result["reference_count"] == 400
    assert result["d1_ratio_train_pixel"] == result["d1_ratio_data_pixel"]
    assert os.path.exists(os.path.join(workdir, "eval", f"step{step}_copies.png"))
    assert result["num_samples"] == config.eval.num_samples and result["step"] == step
    # The one-screen summary on stdout: each metric with its value.
    summary = proc.stdout.strip().splitlines()
    assert summary[0].startswith(f"Evaluation of {workdir}, checkpoint step{step}")
    assert len(summary) < 25
    fd_line = next(line for line in summary if "classifier FD" in line)
    assert f"{result['classifier_fd']:.4g}" in fd_line and "lower is better" in fd_line
    # No TensorFlow start-up lines or no-TPU note on the terminal.
    assert "oneDNN" not in proc.stderr and "libtpu" not in proc.stderr

    with pytest.raises(FileNotFoundError, match="checkpoint 3 is not in"):
        run_evaluation(config, workdir, "step:3")
    with pytest.raises(FileNotFoundError, match="no checkpoints to evaluate.*rounds"):
        run_evaluation(config, workdir, "round:3")
    with pytest.raises(FileNotFoundError, match="no checkpoints to evaluate"):
        run_evaluation(config, os.path.join(out, "nothing-here"))
    with pytest.raises(ValueError, match="not 'latest'"):
        run_evaluation(config, workdir, "best")
    config.eval.metrics = "fid,precision"
    with pytest.raises(ValueError, match=r"unknown metrics \['precision'\]"):
        run_evaluation(config, workdir)


@pytest.mark.slow
def test_sampler_steps_reevaluates_the_final_checkpoints_beside_the_recorded_metrics(
        smoke_run, tmp_path, monkeypatch):
    """benchmarks/sampler_steps.py on the smoke runs: the run's own step count reproduces the
    metrics the reproduction recorded, another one is kept beside them, and records are read
    back, not measured again."""
    import sampler_steps

    out, _, _ = smoke_run
    target, archive = str(tmp_path / "steps"), str(tmp_path / "kept")
    args = ["--runs", out, "--out", target, "--archive", archive, "--plan", "0:smoke,1:smoke",
            "--rows", "sfbd,oracle", "--steps", "6,4"]
    text = sampler_steps.main(args)
    with open(os.path.join(target, "sampler_steps.json")) as f:
        records = {(r["row"], r["steps"]): r for r in json.load(f)}
    assert sorted(records) == [("oracle", 4), ("oracle", 6), ("sfbd", 4), ("sfbd", 6)]
    for row, round_ in (("sfbd", 2), ("oracle", None)):
        workdir = reproduce_mnist.row_workdir(out, 0, "smoke", row)
        with open(os.path.join(workdir, "reproduce_row.json")) as f:
            recorded = next(r for r in json.load(f) if r["round"] == round_)
        same = records[(row, 4)]  # the smoke config's own sampler.num_steps
        for key in ("classifier_fd", "swd", "noise_sigma", "recall"):
            assert same[key] == pytest.approx(recorded[key], rel=1e-6), (row, key)
        finer = records[(row, 6)]
        assert finer["classifier_fd"] != same["classifier_fd"]
        assert finer["sampler_num_steps"] == 6 and same["sampler_num_steps"] == 4
        evaluations = os.listdir(os.path.join(workdir, "eval"))
        assert any(name.endswith("_steps6.json") for name in evaluations)
        assert not any("_steps4" in name for name in evaluations)  # the run's own count
    assert records[("sfbd", 4)]["checkpoint"] == "round:2"
    assert "| smoke | sfbd | 4 (7) | " in text and "| smoke | sfbd | 6 − 4 | " in text
    # Seed 1 was not trained here: skipped. Re-running reads every record back (here, or from
    # the archive on a machine without the runs) and measures nothing.
    real_measure = sampler_steps.measure

    def measure_only_seed_1(runs, seed, *args):
        assert seed == 1, "a kept record was measured again"
        return real_measure(runs, seed, *args)  # not trained here: looked for, skipped

    monkeypatch.setattr(sampler_steps, "measure", measure_only_seed_1)
    assert sampler_steps.main(args) == text
    assert sampler_steps.main(["--runs", str(tmp_path / "none"), "--out", str(tmp_path / "b"),
                               "--archive", archive, "--plan", "0:smoke", "--rows",
                               "sfbd,oracle", "--steps", "4,6", "--finished_only"]) == text
    with pytest.raises(ValueError, match="unknown rows"):
        sampler_steps.main(["--runs", out, "--out", target, "--rows", "sfdb"])
    with pytest.raises(ValueError, match="at least 2 levels"):
        sampler_steps.main(["--runs", out, "--out", target, "--steps", "1,4"])


def test_gmm_convergence_smoke(tmp_path):
    result = gmm_convergence.main(["--variant", "smoke", "--out", str(tmp_path),
                                   "--online_rules", "fixed,adaptive"])
    rounds = [r for r in result["rows"] if "round" in r]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(np.isfinite(r["swd"]) and np.isfinite(r["mean_log_density"]) for r in rounds)
    assert np.isfinite(rounds[1]["denoised_mse"])
    both = [r for r in result["rows"] if "online_round" in r]
    assert [(r["online_round"], r["online_rule"]) for r in both] == [(1, "fixed"),
                                                                     (1, "adaptive")]
    # 1 round = 2 refreshes of half the set: the second meets only new samples, so q is
    # never needed; the adaptive run equals the fixed one.
    assert both[1]["commit_fractions"] == [] and both[1]["swd"] == both[0]["swd"]
    online = both[:1]
    assert np.isfinite(online[0]["swd"]) and np.isfinite(online[0]["buffer_mse"])
    for name in ("gmm_smoke.json", "gmm_smoke_distances.png", "gmm_smoke_scatter.png"):
        assert os.path.exists(tmp_path / name)
    # The seeds table (here the same run twice: a zero-width interval around the difference).
    path = str(tmp_path / "gmm_smoke.json")
    text = gmm_convergence.main(["--variant", "smoke", "--out", str(tmp_path),
                                 "--table", path, path])["table"]
    diff = online[0]["swd"] - rounds[1]["swd"]
    assert f"| round 1 | online SFBD, fixed refresh | {online[0]['swd']:.4f} ± 0.0000" in text
    assert f"| {diff:.4f} ± 0.0000 | " in text
    assert "| round 1 | adaptive − fixed (paired) |" in text


def test_gmm_log_density_is_exact():
    """The mixture log-density against a direct sum for a 2-component 3-D mixture."""
    means, std = np.array([[0.0, 0, 0], [1.0, 0, 0]]), 0.5
    x = np.array([[0.2, -0.1, 0.3]])
    gauss = lambda m: np.exp(-np.sum((x - m) ** 2) / (2 * std**2)) / (2 * np.pi * std**2) ** 1.5
    direct = np.log(0.5 * gauss(means[0]) + 0.5 * gauss(means[1]))
    assert gmm_convergence.log_density(x, means, std)[0] == pytest.approx(direct, rel=1e-12)


@pytest.mark.slow
def test_budget_probe_evaluates_each_budget_of_one_long_run(smoke_run, monkeypatch):
    import budget_probe

    from sfbd_jax.training import loop

    out, _, _ = smoke_run  # its own files beside the table's; the classifier cache is shared
    points = budget_probe.main(["--out", out, "--smoke", "--points", "1,2"])
    assert [p["point"] for p in points] == [1, 2]
    assert [p["train_images"] for p in points] == [192, 384]  # the smoke table's budget: 192
    for p in points:
        assert np.isfinite(p["classifier_fd"]) and 0 <= p["confident_fraction"] <= 1
    with open(os.path.join(out, "budget_probe.md")) as f:
        text = f.read()
    assert "| 384 | 2 |" in text and "real digits" in text
    assert os.path.exists(os.path.join(out, "budget_probe_samples.png"))
    # Evaluated points are read back: nothing is trained again.
    monkeypatch.setattr(loop, "train_and_evaluate", lambda *a: pytest.fail("retrained"))
    assert budget_probe.main(["--out", out, "--smoke", "--points", "1,2"]) == points
