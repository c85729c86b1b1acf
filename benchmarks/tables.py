"""What the benchmark tables share: mean ± 95% confidence interval over seeds, the numbers of an
evaluation record, and the columns of the memorisation and quality/diversity metrics."""

from __future__ import annotations

import os

import numpy as np

# (key of the evaluation record, column header, digits).
NEIGHBOUR_COLUMNS = (
    ("memorised_fraction_train_pixel", "memorised: train set, px", 3),
    ("d1_ratio_train_pixel", "d₁ ratio: train set, px", 2),
    ("copy_ratio_train_pixel", "copy ratio: train set, px", 2),
    ("memorised_fraction_data_pixel", "memorised: all clean, px", 3),
    ("precision", "precision ↑", 3), ("recall", "recall ↑", 3),
    ("density", "density", 3), ("coverage", "coverage ↑", 3))


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor: its name, family/model/stepping and whether it has AVX-512 (XLA's CPU
    kernels, hence the last bits of a training run, depend on it and on the core count:
    benchmarks/determinism_probe.py); the platform's word for it where /proc/cpuinfo is
    missing (macOS)."""
    import platform

    try:
        with open(cpuinfo) as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    ident = "/".join(fields[k] for k in ("cpu family", "model", "stepping") if k in fields)
    avx512 = "avx512f" in fields.get("flags", "").split()
    return f"{name}" + (f" (family/model/stepping {ident})" if ident else "") + (
        ", AVX-512" if avx512 else "")


def machine() -> str:
    """The machine and its load average now (for the evidence's 'machine and load')."""
    return f"{cpu_model()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}"


def archived_file(archive: str, seed: int, row: str) -> str:
    """The committed copy of row ``row``, seed ``seed`` in the archive folder ``archive``
    ("" when no archive is named): one naming scheme for every per-row benchmark."""
    return os.path.join(archive, f"seed{seed}_{row}.json") if archive else ""


def finished_row(done: str, kept: str = "") -> dict | list:
    """A finished benchmark row (a JSON record: one dict, or a list of them for a row with
    rounds): the run's own record ``done``, else its committed copy ``kept`` (a file in an
    archive folder, so a table can be built across machines; "" = no archive); {} when neither
    exists. A row found only in ``done`` is copied to ``kept``."""
    from sfbd_jax.utils import jsonfile

    for path in (done, kept):
        if path and os.path.exists(path):
            row = jsonfile.read_json(path, {})
            if kept and not os.path.exists(kept):  # finished before the archive was named
                jsonfile.write_json(kept, row)
            return row
    return {}


def record_row(row: dict | list, done: str, kept: str = "") -> None:
    """Write a (finished or updated) row to the run's record ``done`` and, when an archive is
    named, to its committed copy ``kept``."""
    from sfbd_jax.utils import jsonfile

    jsonfile.write_json(done, row)
    if kept:
        jsonfile.write_json(kept, row)


def metrics_of(result: dict) -> dict:
    """The numbers of an evaluation record (wall-clock times left out)."""
    return {k: v for k, v in result.items()
            if isinstance(v, float) and not k.endswith("_seconds")}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t confidence interval; NaN for one value)."""
    from scipy import stats

    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1)
                                  / np.sqrt(len(v)))


def fmt(values: list[float], digits: int, bold_nonzero: bool = False,
        signed: bool = False) -> str:
    """'–' for none, the value for one, 'mean ± 95% half-width' for several; ``bold_nonzero``
    (for differences): the cell in Markdown bold when the interval excludes 0; ``signed``: the
    mean (or the value) with its sign, '+0.12'."""
    if not values:
        return "–"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}"
    mean, half = mean_ci(values)
    text = f"{mean:{sign}.{digits}f} ± {half:.{digits}f}"
    return f"**{text}**" if bold_nonzero and abs(mean) > half else text


def differences(a: dict, b: dict, columns) -> dict:
    """a − b for every (key, header, digits) column whose key both results hold."""
    return {key: a[key] - b[key] for key, _, _ in columns
            if a.get(key) is not None and b.get(key) is not None}


def cells(group: list[dict], columns, bold_nonzero: bool = False,
          signed: bool = False) -> list[str]:
    """One formatted cell per (key, header, digits) column over the rows of ``group``
    (``bold_nonzero``, ``signed``: see ``fmt``); a cell over only some of the rows (a metric
    added after the others ran) says how many: '0.169 (1 of 3)'."""
    out = []
    for key, _, digits in columns:
        values = [g[key] for g in group if g.get(key) is not None]
        partial = f" ({len(values)} of {len(group)})" if 0 < len(values) < len(group) else ""
        out.append(fmt(values, digits, bold_nonzero, signed) + partial)
    return out


def paired_table(results: list[dict], baseline: str, columns) -> str:
    """Markdown table of each row's difference to ``baseline`` on the same seed, mean ± 95%
    interval over the seeds both have (rows compared paired: the seed-to-seed spread of a
    metric is often larger than the rows' differences), in bold where the interval excludes 0.
    ``columns``: (key, header, digits). Empty when no result is of ``baseline``."""
    base = {r["seed"]: r for r in results if r["row"] == baseline}
    if not base:
        return ""
    lines = [f"| row − {baseline} (same seed) | " + " | ".join(h for _, h, _ in columns)
             + " | seeds |", "|---|" + "---|" * len(columns) + "---|"]
    for row in dict.fromkeys(r["row"] for r in results):
        group = [r for r in results if r["row"] == row and r["seed"] in base]
        if row == baseline or not group:
            continue
        diffs = [[r[k] - base[r["seed"]][k] for r in group
                  if r.get(k) is not None and base[r["seed"]].get(k) is not None]
                 for k, _, _ in columns]
        lines.append(f"| {row} | " + " | ".join(
            fmt(d, digits, bold_nonzero=True, signed=True)
            for d, (_, _, digits) in zip(diffs, columns, strict=True))
            + " | " + ",".join(str(r["seed"]) for r in group) + " |")
    return "\n".join(lines)

