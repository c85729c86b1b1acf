"""benchmarks/data_scale.py end to end on a tiny synthetic set: the rows it records, that a
second call skips them, and that another backward cost is another row."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "data_scale.py")


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_data_scale_records_memory_rows_and_resumes(tmp_path):
    out, archive = str(tmp_path / "out"), str(tmp_path / "archive")
    common = ["--out", out, "--archive", archive, "--sizes", "200", "--image_size", "16"]
    _run(*common, "--kinds", "sfbd_round,ambient", "--backward_evaluations", "1")
    rows = _rows(os.path.join(archive, "results.jsonl"))
    assert [r["kind"] for r in rows] == ["disk", "sfbd_round", "ambient"]
    disk, sfbd_round, ambient = rows
    # 20 clean images as uint8 (16·16·3 bytes each plus the .npy header), noisy as float16.
    assert disk["groups"]["clean"]["dtype"] == "uint8"
    assert 768 <= disk["groups"]["clean"]["bytes_per_image"] < 768 * 1.2
    assert disk["groups"]["noisy"]["dtype"] == "float16"
    assert sfbd_round["backward_evaluations"] == 1 and sfbd_round["pieces"] == 1
    for r in (sfbd_round, ambient):
        assert 100 < r["peak_rss_anon_mib"] < 16_000 and r["seconds"] > 0
    # The SFBD round denoised every noisy image into the data set's denoised shards.
    work = os.path.join(out, "work", "sfbd_round-synthetic200_16-eval1")
    summary = json.load(open(os.path.join(work, "sfbd_summary.json")))
    assert [r["round"] for r in summary] == [0, 1]
    with open(work + ".log") as f:  # the backward pass ran at the requested cost
        assert "(1 network evaluations each" in f.read()
    # A second call finds every row done; the default cost (3 evaluations) is another row.
    _run(*common, "--kinds", "sfbd_round,ambient", "--backward_evaluations", "1")
    assert len(_rows(os.path.join(archive, "results.jsonl"))) == 3
    _run(*common, "--kinds", "sfbd_round")
    rows = _rows(os.path.join(archive, "results.jsonl"))
    assert len(rows) == 4 and rows[-1]["backward_evaluations"] == 3
    # A speed variant measured once is reported without an interval (not as "± 0").
    with open(os.path.join(archive, "results.jsonl"), "a") as f:
        f.write(json.dumps({"kind": "speed-memory", "images": 200, "image_size": 16,
                            "images_per_sec": 50.0, "input_wait_fraction": 0.01,
                            "seconds": 1.0}) + "\n")
    report = _run("--out", out, "--archive", archive, "--report")
    assert "| 200 × 16² | memory | 1 | 50.0 (no interval) |" in report
    assert "| 200 × 16² | sfbd_round (1 evaluation/image) |" in report
    assert "| 200 × 16² | sfbd_round |" in report and "| 200 × 16² | ambient |" in report
