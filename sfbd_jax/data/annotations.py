"""Noise-level annotations of a prepared data set, saved beside its shards and listed in its
manifest (Ambient-Omni, METHODS.md §3).

An annotation covers the low-quality ("noisy") group of a prepared directory, in shard order:
``sigma_min`` (N,) and optionally ``sigma_max`` (N,) and ``sigma_n`` (N,) (known noise levels).
It is stored as checksummed shards

    annotations/<name>/sigma_min.npy   annotations/<name>/sigma_max.npy

and recorded under ``manifest["annotations"][name]`` with the method, the settings that
produced it and a summary. ``name`` = method + a hash of those settings, so annotations made
with other settings sit side by side instead of overwriting each other. The clean group is
σ_min = 0 by definition and is not stored.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from sfbd_jax.data import shards
from sfbd_jax.data.prepare import MANIFEST, read_manifest
from sfbd_jax.utils import jsonfile

ARRAYS = ("sigma_min", "sigma_max", "sigma_n")


def annotation_name(method: str, settings: dict) -> str:
    """``method-<10 hex digits of sha256(settings)>``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"{method}-{digest[:10]}"


def _quantiles(values: np.ndarray) -> dict:
    q = (np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0]).tolist() if values.size
         else [None] * 5)
    return dict(zip(("min", "q10", "median", "q90", "max"), q, strict=True))


def summary(sigma_min: np.ndarray, sigma_max: np.ndarray | None = None) -> dict:
    """Quantiles of the finite σ_min values (None when there are none), the count of infinite
    ones and, when given, the quantiles of σ_max (for the log and the manifest)."""
    finite = sigma_min[np.isfinite(sigma_min)]
    out = {"count": int(sigma_min.size), "infinite": int(sigma_min.size - finite.size),
           "sigma_min_quantiles": _quantiles(finite)}
    if sigma_max is not None:
        out["sigma_max_quantiles"] = _quantiles(np.asarray(sigma_max, np.float64))
    return out


def save(data_dir: str, method: str, settings: dict, arrays: dict[str, np.ndarray],
         info: dict | None = None) -> str:
    """Store ``arrays`` (``sigma_min`` required, ``sigma_max`` and ``sigma_n`` optional; each
    (N_noisy,)) for the noisy group of ``data_dir``; returns the annotation's name. Process 0
    writes."""
    manifest = read_manifest(data_dir)
    n = int(manifest["counts"]["noisy"])
    if "sigma_min" not in arrays or set(arrays) - set(ARRAYS):
        raise ValueError(f"annotation arrays must be sigma_min [+ sigma_max, sigma_n], got "
                         f"{sorted(arrays)}")
    for key, a in arrays.items():
        if np.shape(a) != (n,):
            raise ValueError(f"annotation {key} has shape {np.shape(a)}; the noisy group of "
                             f"{data_dir} holds {n} images")
    name = annotation_name(method, settings)
    if jax.process_index() != 0:
        return name
    entries = {key: shards.write_shard(data_dir, os.path.join("annotations", name, f"{key}.npy"),
                                       np.asarray(a, np.float64))
               for key, a in arrays.items()}
    manifest.setdefault("annotations", {})[name] = {
        "method": method, "settings": settings, "arrays": entries,
        "summary": summary(np.asarray(arrays["sigma_min"], np.float64),
                           arrays.get("sigma_max")), **(info or {})}
    jsonfile.write_json(os.path.join(data_dir, MANIFEST), manifest)
    return name


def load(data_dir: str, name: str) -> dict[str, np.ndarray] | None:
    """The arrays of annotation ``name`` (checksums verified), or None if it was never saved."""
    record = read_manifest(data_dir).get("annotations", {}).get(name)
    if record is None:
        return None
    return {key: shards.read_shard(data_dir, entry, allow_inf=key == "sigma_min")
            for key, entry in record["arrays"].items()}


def record(data_dir: str, name: str) -> dict | None:
    """The manifest entry of annotation ``name`` (method, settings, summary, …)."""
    return read_manifest(data_dir).get("annotations", {}).get(name)
