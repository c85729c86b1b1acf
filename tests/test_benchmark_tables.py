"""The benchmark tables' statistics: the 95% Student-t interval and the paired-by-seed table."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import tables  # noqa: E402


def test_mean_ci_is_the_student_t_interval():
    mean, half = tables.mean_ci([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.3027, s = 1, n = 3.
    assert mean == 2.0 and half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert np.isnan(tables.mean_ci([5.0])[1])


def test_paired_table_differences_by_seed():
    results = [{"row": "base", "seed": s, "fd": f} for s, f in ((0, 10.0), (1, 20.0), (2, 30.0))]
    # 'better' is 1, 2, 3 below the baseline of its own seed; unpaired its mean is 18 ± 25.
    results += [{"row": "better", "seed": s, "fd": f} for s, f in ((0, 9.0), (1, 18.0), (2, 27.0))]
    # 'steady' is 1.0, 1.1, 0.9 above it: an interval that excludes 0, so the cell is bold.
    results += [{"row": "steady", "seed": s, "fd": f} for s, f in ((0, 11.0), (1, 21.1), (2, 30.9))]
    results += [{"row": "alone", "seed": 7, "fd": 1.0}]  # no baseline on seed 7: left out
    text = tables.paired_table(results, "base", (("fd", "FD", 2),))
    lines = text.splitlines()
    assert lines[0] == "| row − base (same seed) | FD | seeds |"
    mean, half = tables.mean_ci([-1.0, -2.0, -3.0])
    assert lines[2] == f"| better | {mean:+.2f} ± {half:.2f} | 0,1,2 |"  # spans 0: plain
    mean, half = tables.mean_ci([1.0, 1.1, 0.9])
    assert lines[3] == f"| steady | **{mean:+.2f} ± {half:.2f}** | 0,1,2 |" and len(lines) == 4
    assert tables.paired_table(results, "missing", (("fd", "FD", 2),)) == ""


def test_finished_rows_are_read_from_the_run_or_the_archive(tmp_path):
    done = str(tmp_path / "run" / "row.json")
    kept = tables.archived_file(str(tmp_path / "archive"), 0, "a")
    assert kept == str(tmp_path / "archive" / "seed0_a.json")
    assert tables.archived_file("", 0, "a") == ""
    assert tables.finished_row(done, kept) == {} and not os.path.exists(kept)
    tables.record_row({"fd": 1.0}, done)  # no archive named: the run's record only
    assert not os.path.exists(kept)
    assert tables.finished_row(done, kept) == {"fd": 1.0} and os.path.exists(kept)  # copied
    os.remove(done)  # another machine: only the committed copy
    assert tables.finished_row(done, kept) == {"fd": 1.0}
    tables.record_row({"fd": 2.0}, done, kept)
    assert tables.finished_row("", kept) == tables.finished_row(done) == {"fd": 2.0}


def test_cep_paired_tables_pair_each_guidance_with_the_clean_row_of_its_seed():
    import cep_mnist

    def row(name, seed, fd1, fd2=None):
        by = {"1": {"classifier_fd_class_mean": fd1}}
        if fd2 is not None:
            by["2"] = {"classifier_fd_class_mean": fd2}
        return {"row": name, "seed": seed, "by_guidance": by}

    results = [row("clean", 0, 10.0, 8.0), row("clean", 1, 12.0, 9.0),
               row("flip5", 0, 11.0, 8.5), row("flip5", 1, 14.0)]  # seed 1 lacks guidance 2
    text = cep_mnist.paired_tables(results)
    blocks = text.split("Guidance ")
    assert [b.splitlines()[0] for b in blocks[1:]] == ["1:", "2:"]
    mean, half = tables.mean_ci([1.0, 2.0])
    assert f"| flip5 | {mean:+.2f} ± {half:.2f} | – | – | – | – | 0,1 |" in blocks[1]
    assert "| flip5 | +0.50 | – | – | – | – | 0 |" in blocks[2]
    assert cep_mnist.paired_tables([row("flip5", 0, 11.0)]) == ""


def test_cpu_model_names_the_processor_and_its_instruction_set(tmp_path):
    info = tmp_path / "cpuinfo"
    processor = ("processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                 "model name\t: AMD EPYC 9654\nstepping\t: 1\nflags\t\t: fpu sse2 avx2 {extra}\n")
    info.write_text(processor.format(n=0, extra="avx512f avx512bw") + "\n"
                    + processor.format(n=1, extra="avx512f"))
    assert tables.cpu_model(str(info)) == ("AMD EPYC 9654 (family/model/stepping 25/17/1), "
                                           "AVX-512")
    info.write_text(processor.format(n=0, extra="avx512vl"))  # no avx512f: not AVX-512
    assert tables.cpu_model(str(info)).endswith("25/17/1)")
    assert tables.cpu_model(str(tmp_path / "missing"))  # the platform's word for it
    assert "CPU cores, load average" in tables.machine()


def test_sampler_steps_table_pairs_each_step_count_with_the_fewest_on_the_same_seed():
    import sampler_steps

    def record(seed, steps, fd, noise):
        return {"seed": seed, "variant": "sigma0.2", "row": "sfbd", "steps": steps,
                "classifier_fd": fd, "noise_sigma": noise}

    records = [record(s, 10, fd, 0.07) for s, fd in ((0, 3.0), (1, 5.0), (2, 4.0))]
    # 18 levels: FD 0.2, 0.3, 0.1 lower on each seed (the interval spans 0: plain); σ̂ −0.02 on
    # every seed (a zero-width interval excluding 0: bold).
    records += [record(s, 18, fd, 0.05) for s, fd in ((0, 2.8), (1, 4.7), (2, 3.9))]
    records += [record(1, 32, 4.6, 0.04)]  # one seed only: a bare value
    lines = sampler_steps.table(records).splitlines()
    assert lines[2].startswith("| sigma0.2 | sfbd | 10 (19) | 4.00 ± ")
    assert lines[3].startswith("| sigma0.2 | sfbd | 18 (35) | ")
    assert lines[4].startswith("| sigma0.2 | sfbd | 32 (63) | 4.60 | ")
    assert lines[4].endswith("| 1 |")
    diff18 = next(line for line in lines if line.startswith("| sigma0.2 | sfbd | 18 − 10 |"))
    mean, half = tables.mean_ci([-0.2, -0.3, -0.1])
    cells = [c.strip() for c in diff18.split("|")[1:-1]]
    assert half > abs(mean) and cells[3] == f"{mean:+.2f} ± {half:.2f}"
    assert cells[5] == "**-0.020 ± 0.000**" and cells[-1] == "0,1,2"
    diff32 = next(line for line in lines if line.startswith("| sigma0.2 | sfbd | 32 − 10 |"))
    assert "| -0.40 |" in diff32 and diff32.endswith("| 1 |")


def test_sampler_steps_table_pairs_rows_with_the_baseline_at_each_step_count():
    import sampler_steps

    def record(row, seed, steps, noise):
        return {"seed": seed, "variant": "sigma0.2", "row": row, "steps": steps,
                "noise_sigma": noise}

    records = [record("sfbd", s, n, 0.07 - 0.02 * (n > 10) + 0.001 * s)
               for s in (0, 1, 2) for n in (10, 32)]
    # TweedieDiff: 0.055 below SFBD at 10 levels on every seed, 0.037 below at 32; seed 2 has
    # no 32-level record, so that line pairs seeds 0 and 1 only.
    records += [record("tweediediff", s, 10, 0.015 + 0.001 * s) for s in (0, 1, 2)]
    records += [record("tweediediff", s, 32, 0.013 + 0.001 * s) for s in (0, 1)]
    records += [record("oracle", 0, 18, 0.01)]  # no step count in common: no line
    assert "rows (paired)" not in sampler_steps.table(records)  # no baseline named
    lines = sampler_steps.table(records, baseline="sfbd").splitlines()
    start = next(i for i, line in enumerate(lines) if "| rows (paired) | sampler steps |" in line)
    across = lines[start + 2:]
    assert len(across) == 2
    cells10, cells32 = ([c.strip() for c in line.split("|")[1:-1]] for line in across)
    assert cells10[:3] == ["sigma0.2", "tweediediff − sfbd", "10"]
    assert cells10[5] == "**-0.055 ± 0.000**" and cells10[-1] == "0,1,2"
    assert cells32[:3] == ["sigma0.2", "tweediediff − sfbd", "32"]
    assert cells32[5] == "**-0.037 ± 0.000**" and cells32[-1] == "0,1"
    assert cells10[3] == "–"  # a metric neither row holds


def test_budget_probe_refuses_other_overrides_in_the_same_out(tmp_path, capsys):
    """One setting per OUT: a probe made with other ``--set`` overrides (or none) is not
    extended, and a bad key is named; both before anything is trained."""
    import budget_probe

    from sfbd_jax.utils import jsonfile

    jsonfile.write_json(str(tmp_path / "budget_probe.json"), {"points": [], "overrides": {}})
    with pytest.raises(SystemExit):
        budget_probe.main(["--out", str(tmp_path), "--smoke", "--set", "optim.lr=3e-3"])
    assert "holds a probe with the overrides {}, not {'optim.lr': '3e-3'}" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        budget_probe.main(["--out", str(tmp_path), "--smoke", "--set", "optim.lrr=3e-3"])
    assert "the config has no key 'optim.lrr'" in capsys.readouterr().err
    assert budget_probe.table({"points": [], "overrides": {"optim.lr": "3e-3"},
                               "real": {"count": 1, "confident_fraction": 1.0,
                                        "classifier_confidence": 1.0}}).startswith(
        "Overrides of the oracle's config: `optim.lr=3e-3`")


def test_budget_probe_pairs_two_settings_by_seed_at_each_common_budget():
    import budget_probe

    def probe(overrides, values):  # values: {(seed, point): FD}
        points = [{"seed": s, "point": p, "classifier_fd": fd, "swd": 0.1,
                   "confident_fraction": 0.2, "classifier_confidence": 0.5, "precision": 0.8,
                   "recall": 0.9} for (s, p), fd in values.items()]
        return {"points": points, "overrides": overrides}

    base = probe({}, {(0, 1): 5.0, (1, 1): 6.0, (2, 1): 7.0, (0, 2): 3.0, (0, 4): 2.0})
    other = probe({"optim.lr": "3e-3"}, {(0, 1): 4.0, (1, 1): 5.1, (2, 1): 5.9, (0, 2): 3.5,
                                         (0, 8): 1.0})
    lines = budget_probe.paired_table(other, base).splitlines()
    assert lines[0].startswith("| (optim.lr=3e-3) − (the table's setting), same seed | "
                               "classifier FD ↓ |")
    mean, half = tables.mean_ci([-1.0, -0.9, -1.1])
    assert lines[2].startswith(f"| 1 × B | **{mean:+.2f} ± {half:.2f}** | +0.0000 ± 0.0000 |")
    assert lines[2].endswith("| 0,1,2 |")
    assert lines[3].startswith("| 2 × B | +0.50 | +0.0000 |") and len(lines) == 4  # 4, 8: unpaired
