"""benchmarks/RESULTS.md's marked tables are what the committed archives rebuild, byte for byte.

Each table between ``<!-- table-NAME -->`` and ``<!-- /table-NAME -->`` was written by a
benchmark script from records kept under benchmarks/results/; rebuilding it here from those
records alone (no runs, nothing trained) catches a table edited by hand, an archive changed
without its table, or a change to the scripts' tabulation that would silently alter them.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import reproduce_mnist  # noqa: E402
import sampler_steps  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
ARCHIVE = os.path.join(ROOT, "benchmarks", "results")
THREE_SEEDS = "0:{v},1:{v},2:{v}"


def marked_table(name: str) -> str:
    """The text of RESULTS.md between the markers of table ``name``."""
    with open(RESULTS) as f:
        text = f.read()
    start, end = f"<!-- table-{name} -->\n", f"\n<!-- /table-{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"markers of {name}"
    return text[text.index(start) + len(start):text.index(end)]


def equal_compute_results(variant: str, tmp_path) -> list[dict]:
    """The rows of the equal-compute tables, read from the two archives as RESULTS.md says."""
    plan = reproduce_mnist.parse_plan(THREE_SEEDS.format(v=variant))
    results = reproduce_mnist.collect(
        plan, str(tmp_path), finished_only=True, equal_compute=True,
        archive=os.path.join(ARCHIVE, "reproduce_mnist_eq"),
        also_read=(os.path.join(ARCHIVE, "reproduce_mnist"),))
    assert results, "no archived rows"
    return results


@pytest.mark.parametrize("variant,name", [("sigma0.2", "eq-0.2"), ("sigma0.59", "eq-0.59")])
def test_equal_compute_tables_are_rebuilt_from_the_archives(variant, name, tmp_path):
    results = equal_compute_results(variant, tmp_path)
    assert reproduce_mnist.final_table(results) == marked_table(name)


def test_sampler_steps_rows_table_is_rebuilt_from_the_archive(tmp_path):
    plan = reproduce_mnist.parse_plan(THREE_SEEDS.format(v="sigma0.2"))
    records = sampler_steps.collect(plan, ["sfbd", "sfbd_quick", "tweediediff", "oracle"],
                                    [10, 32], str(tmp_path / "runs"), str(tmp_path / "out"),
                                    os.path.join(ARCHIVE, "sampler_steps"), True, True)
    assert len(records) == 3 * 4 * 2
    assert sampler_steps.table(records, "sfbd") == marked_table("sampler-steps-rows")
