"""Make the corrupted data set once: ``python -m sfbd_jax.data.prepare --config configs/X.py``.

A seeded split of the clean source into a clean subset (``corrupt.clean_count`` images, or
``corrupt.clean_fraction`` of them) and a remainder that is corrupted exactly once, written to
``corrupt.output_dir`` as checksummed shards with ``manifest.json``:

    manifest.json
    clean/images-00000.npy  clean/labels-00000.npy  clean/indices-00000.npy
    noisy/images-00000.npy  noisy/labels-00000.npy  noisy/indices-00000.npy
    eval_only/originals-00000.npy   (clean originals of the noisy images; evaluation only)

``indices`` are the positions of each image in the source. The noise of source image i is drawn
from fold_in(PRNGKey(noise_seed), i): the same whatever the shard size. Noisy values are stored
unclipped (float32, or float16 with its rounding error recorded in the manifest). With
``corrupt.type='folder'`` the low-quality group is the images of ``corrupt.folder`` as they are,
with ``'ood'`` an out-of-distribution pool (``pool_source``: other classes of the source, or
another tfds set) as it is; indices count on after the source's, the non-clean part of the
source is left out and there are no eval_only originals. ``corrupt.label_flip`` = η flips
round(η·N) labels of the source (seeded by ``corrupt.label_flip_seed``; the flipped indices and
original labels go to eval_only/). The source is streamed chunk by chunk; at most one shard
per output is held in memory. Preparing again with the same settings is a no-op; other
settings refuse to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
from absl import logging

from sfbd_jax import config_checks, corruptions
from sfbd_jax.data import pixels, shards, sources
from sfbd_jax.utils import devices

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: clean images and originals stored as uint8 pixels when exact
PARAMS_BY_TYPE = config_checks.CORRUPTION_PARAMS
SOURCE_KEYS = ("source", "tfds_name", "split", "data_dir", "folder", "image_size",
               "center_crop", "channels")


def settings_record(config) -> dict:
    """What determines the prepared bytes: the source, the split and the corruption."""
    c = config.corrupt
    config_checks.check_corruption(config)
    source = {k: config.data[k] for k in SOURCE_KEYS}
    if config.data.classes:  # recorded only when used, as lists (JSON round trip)
        source["classes"] = [int(k) for k in config.data.classes]
    if config.data.subset:  # recorded only when used: older manifests stay valid
        source.update(subset=int(config.data.subset), subset_seed=int(config.data.subset_seed))
    if "folder" in (config.data.source, c.type):  # since images are fitted one by one
        source.update(fit="centre square, bicubic", unreadable=config.data.unreadable_files)
    extra = {}
    if c.label_flip:  # likewise
        extra["label_flip"] = {"eta": float(c.label_flip), "seed": int(c.label_flip_seed)}
    return {**extra,
        "source": source,
        "split_seed": int(c.split_seed),
        "noise_seed": int(c.noise_seed),
        "clean_count": int(c.clean_count),
        "clean_fraction": float(c.clean_fraction),
        "corruption": {"type": c.type, **{k: list(map(int, c[k])) if isinstance(c[k], tuple)
                                          else c[k] for k in PARAMS_BY_TYPE[c.type]}},
        "dtype": c.dtype,
        "shard_size": int(c.shard_size),
    }


def split_indices(num_examples: int, clean_count: int, clean_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (clean, corrupted) source positions: a seeded random clean subset of
    ``clean_count`` images (or round(clean_fraction·N) when clean_count is 0)."""
    n_clean = clean_count if clean_count > 0 else int(round(clean_fraction * num_examples))
    if not 0 <= n_clean <= num_examples:
        raise ValueError(f"clean subset of {n_clean} images asked from a source of "
                         f"{num_examples}")
    perm = np.random.default_rng([seed, 0xC1EA4]).permutation(num_examples)
    return np.sort(perm[:n_clean]), np.sort(perm[n_clean:])


class _ShardWriter:
    """Buffers rows of several named arrays and writes a shard of each every ``rows`` rows."""

    def __init__(self, directory: str, group: str, rows: int):
        self.directory, self.group, self.rows = directory, group, rows
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.entries: dict[str, list[dict]] = {}
        self.count = 0

    def add(self, **arrays: np.ndarray) -> None:
        for name, a in arrays.items():
            self.buffers.setdefault(name, []).append(a)
        self.count += len(next(iter(arrays.values())))
        while sum(len(a) for a in next(iter(self.buffers.values()))) >= self.rows:
            self._flush(self.rows)

    def close(self) -> dict[str, list[dict]]:
        if self.buffers and sum(len(a) for a in next(iter(self.buffers.values()))):
            self._flush(None)
        return self.entries

    def _flush(self, rows: int | None) -> None:
        for name, parts in self.buffers.items():
            data = np.concatenate(parts)
            head, tail = (data, data[:0]) if rows is None else (data[:rows], data[rows:])
            index = len(self.entries.get(name, []))
            rel = os.path.join(self.group, f"{name}-{index:05d}.npy")
            self.entries.setdefault(name, []).append(
                shards.write_shard(self.directory, rel, head))
            self.buffers[name] = [tail]


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} → {b.get(k)!r}")
    return out


def _flip_labels(record: dict, source_labels: list, num_examples: int, num_classes: int
                 ) -> dict | None:
    """Condition corruption (corrupt.label_flip = η): round(η·N) labels of the source, chosen
    with the seed, each moved to another class drawn from the class prior
    (corruptions.corrupt_labels). None when η = 0."""
    if "label_flip" not in record:
        return None
    if not source_labels or sum(len(y) for y in source_labels) != num_examples:
        raise ValueError("config.corrupt.label_flip > 0 needs a labelled data source")
    original = np.concatenate(source_labels).astype(np.int64)
    labels, flipped = corruptions.corrupt_labels(original, record["label_flip"]["eta"],
                                                 num_classes, record["label_flip"]["seed"])
    return {"labels": labels, "flipped": flipped, "original": original}


def pool_source(config):
    """The data config of the low-quality pool of corrupt.type 'folder' (the images of
    corrupt.folder) or 'ood' (the ood_classes of config.data's source, or another tfds set),
    resized like config.data."""
    c = config.corrupt
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.subset = 0
        if c.type == "folder":  # corrupt.folder given: config_checks.check_corruption
            data.source, data.folder, data.classes = "folder", c.folder, ()
        elif c.ood_tfds_name:
            data.source, data.tfds_name, data.split = "tfds", c.ood_tfds_name, c.ood_split
            data.classes = ()
        else:
            data.classes = tuple(int(k) for k in c.ood_classes)
    return data


def _write_pool(config, chunk: int, writer: _ShardWriter, first_index: int, convert=None,
                extra: dict | None = None, originals=None) -> int:
    """Stream the pool of ``pool_source`` into ``writer``, indexed from ``first_index`` on
    (after the source's); returns how many. Stored as uint8 pixels, or as ``convert(images)``
    (a mixed set's dtype) with each image also its own original: ``originals`` = (the
    eval_only writer, the clean storage conversion); ``extra``: constant per-row arrays (a mixed
    set's component id)."""
    data = pool_source(config)
    what = (f"the low-quality folder {config.corrupt.folder}" if config.corrupt.type == "folder"
            else "the out-of-distribution pool")
    try:
        _, _, chunks = sources.iter_source(data, chunk)
        count = 0
        for images, labels in chunks:
            exact = pixels.exact_uint8(images)  # decoded pixels are always uint8 pixels
            if exact is None:
                raise RuntimeError(f"images of {what} are not uint8 pixels")
            rows = {k: np.full(len(images), v, np.int32) for k, v in (extra or {}).items()}
            if labels is not None and config.corrupt.type != "folder":
                rows["labels"] = np.asarray(labels, np.int32)
            if writer.buffers and ("labels" in writer.buffers) != ("labels" in rows):
                raise ValueError("the pool and the corrupted source images must both have "
                                 "labels or both have none")
            writer.add(images=exact if convert is None else convert(images),
                       indices=first_index + np.arange(count, count + len(images)), **rows)
            if originals is not None:
                originals[0].add(originals=originals[1](images))
            count += len(images)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from err
    if count == 0:
        raise ValueError(f"{what} holds no images")
    return count


def _more_precise_copy(recorded: dict, asked: dict) -> bool:
    """Whether a recorded set differs from the asked one only in storing its noisy values as
    float32 where float16 is asked (e.g. a set prepared before float16 became the default):
    the same corruption, read as stored."""
    return (recorded.get("dtype"), asked.get("dtype")) == ("float32", "float16") and \
        {**recorded, "dtype": None} == {**asked, "dtype": None}


def shards_digest(manifest: dict, groups: tuple[str, ...] | None = None) -> str:
    """sha256 (16 hex digits) of the shard checksums of ``groups`` (all when None): identifies
    the bytes of a prepared set, for the fingerprints of products made from it."""
    digest = hashlib.sha256()
    for group in sorted(groups or manifest["shards"]):
        for name, entries in sorted(manifest["shards"][group].items()):
            for entry in entries:
                digest.update(f"{group}/{name}/{entry['file']}:{entry['sha256']};".encode())
    return digest.hexdigest()[:16]


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} holds no {MANIFEST}: prepare the data set first "
                                "(python -m sfbd_jax.data.prepare --config ...)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the manifest {path}: {err}") from err


def _write_prepared(config, record: dict, tmp: str) -> dict:
    """Write the shards and the manifest of the prepared set into ``tmp``; returns the
    manifest."""
    chunk = max(min(int(config.corrupt.shard_size), 4096), 1)
    name, num_classes, chunks = sources.iter_source(config.data, chunk)
    # A counting pass (streams; holds only the labels).
    source_labels = []
    num_examples = 0
    all_uint8 = True  # are the source images exactly uint8 pixels (stored then as uint8)?
    for x, y in chunks:
        num_examples += len(x)
        all_uint8 = all_uint8 and pixels.exact_uint8(x) is not None
        if y is not None:
            source_labels.append(np.asarray(y))
    clean_storage = "uint8" if all_uint8 else "float32"

    def as_stored(images: np.ndarray) -> np.ndarray:
        """Clean images (and eval-only originals) as they are written: uint8 when exact."""
        return pixels.exact_uint8(images) if all_uint8 else images.astype(np.float32)

    flip = _flip_labels(record, source_labels, num_examples, num_classes)
    clean_idx, noisy_idx = split_indices(num_examples, record["clean_count"],
                                         record["clean_fraction"], record["split_seed"])
    is_clean = np.zeros(num_examples, bool)
    is_clean[clean_idx] = True
    key = jax.random.PRNGKey(record["noise_seed"])
    dtype = np.dtype(record["dtype"])
    clean_w = _ShardWriter(tmp, "clean", record["shard_size"])
    noisy_w = _ShardWriter(tmp, "noisy", record["shard_size"])
    eval_w = _ShardWriter(tmp, "eval_only", record["shard_size"])
    sq_err, max_err, offset = 0.0, 0.0, 0
    t0 = time.time()
    from_folder = record["corruption"]["type"] in ("folder", "ood")  # a pool, as it is
    mixture = (corruptions.parse_mixture(config.corrupt.mixture)
               if record["corruption"]["type"] == "mixed" else None)
    assignment = (None if mixture is None else
                  corruptions.mixture_assignment(num_examples, mixture, record["noise_seed"]))

    def stored_noisy(noisy: np.ndarray) -> np.ndarray:
        """Corrupted values in the storage dtype; the rounding error is accumulated."""
        nonlocal sq_err, max_err
        stored = noisy.astype(dtype)
        if not np.all(np.isfinite(stored)) and np.all(np.isfinite(noisy)):
            raise OverflowError(
                f"corrupted values reach {float(np.abs(noisy).max()):.4g}, beyond the range "
                f"of {dtype.name}: prepare with config.corrupt.dtype='float32'")
        diff = stored.astype(np.float32) - noisy
        sq_err += float(np.sum(diff.astype(np.float64) ** 2))
        max_err = max(max_err, float(np.abs(diff).max(initial=0.0)))
        return stored

    _, _, chunks = sources.iter_source(config.data, chunk)
    for images, labels in chunks:
        index = np.arange(offset, offset + len(images))
        offset += len(images)
        c, n = is_clean[index], ~is_clean[index]
        if flip is not None:
            labels = flip["labels"][index]
        extra = {} if labels is None else {"labels": labels[c]}
        if c.any():
            clean_w.add(images=as_stored(images[c]), indices=index[c], **extra)
        if n.any() and not from_folder:
            rows = {} if labels is None else {"labels": labels[n]}
            if mixture is None:
                noisy = corruptions.apply_corruption(images[n], record["corruption"], key,
                                                     index[n], pad_to=chunk)
            else:  # each image its own component (type and parameters), recorded as 'types'
                rows["types"] = assignment[index[n]]
                noisy = np.empty(images[n].shape, np.float32)
                for k in np.unique(rows["types"]):
                    sel = rows["types"] == k
                    noisy[sel] = corruptions.apply_corruption(images[n][sel], mixture[k], key,
                                                              index[n][sel], pad_to=chunk)
            noisy_w.add(images=stored_noisy(noisy), indices=index[n], **rows)
            eval_w.add(originals=as_stored(images[n]))
        logging.info("prepare: %d / %d images (%.0f s)", offset, num_examples, time.time() - t0)
    if from_folder:  # the low-quality group: the images of the pool, as they are
        noisy_idx = num_examples + np.arange(_write_pool(config, chunk, noisy_w, num_examples))
    ood = [i for i, c in enumerate(mixture or []) if c["type"] == "ood"]
    if ood:  # a mixed set's pool, in the noisy dtype, each image its own original
        pool = _write_pool(config, chunk, noisy_w, num_examples, convert=stored_noisy,
                           extra={"types": ood[0]}, originals=(eval_w, as_stored))
        noisy_idx = np.concatenate([noisy_idx, num_examples + np.arange(pool)])
    pixels_per_image = config.data.image_size**2 * config.data.channels
    if offset != num_examples:
        raise RuntimeError(f"the source yielded {offset} images on the second pass and "
                           f"{num_examples} on the first")
    manifest = {
        "format_version": FORMAT_VERSION,
        "settings": record,
        "source_name": name,
        "num_classes": num_classes,
        "image_shape": [config.data.image_size, config.data.image_size, config.data.channels],
        "counts": {"source": num_examples, "clean": int(len(clean_idx)),
                   "noisy": int(len(noisy_idx))},
        "storage": {"clean": clean_storage,
                    "noisy": "uint8" if from_folder else record["dtype"],
                    "eval_only": clean_storage},
        "storage_rounding": {"dtype": record["dtype"], "max_abs": max_err,
                             "rms": (sq_err / max(len(noisy_idx) * pixels_per_image, 1)) ** 0.5},
        "shards": {"clean": clean_w.close(), "noisy": noisy_w.close(),
                   "eval_only": eval_w.close()},
    }
    if mixture is not None:  # component k of manifest["mixture"] for each noisy row ('types')
        manifest["mixture"] = mixture
    if flip is not None:  # which labels were flipped, from what: for diagnostics only
        changed = np.flatnonzero(flip["flipped"])
        manifest["label_flip"] = {
            **record["label_flip"], "flipped": int(changed.size),
            "flipped_indices": shards.write_shard(tmp, "eval_only/flipped_indices.npy", changed),
            "original_labels": shards.write_shard(tmp, "eval_only/original_labels.npy",
                                                  flip["original"][changed])}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def prepare(config) -> dict:
    """Write (or find already written) the corrupted data set; returns its manifest."""
    out = os.path.abspath(config.corrupt.output_dir or "")
    if not config.corrupt.output_dir:
        raise ValueError("config.corrupt.output_dir is empty: say where to write the data set")
    record = settings_record(config)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        manifest = read_manifest(out)
        if manifest["settings"] == record:
            logging.info("%s already holds this prepared data set: nothing to do.", out)
            return manifest
        if _more_precise_copy(manifest["settings"], record):
            logging.info("%s already holds this prepared data set with its noisy values in "
                         "float32 (float16 asked): read as stored.", out)
            return manifest
        raise FileExistsError(
            f"{out} holds a data set prepared with other settings; refusing to overwrite. "
            "Differences (recorded → asked): " + "; ".join(
                _differences(manifest["settings"], record)) + ". Choose another "
            "config.corrupt.output_dir.")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists, is not empty and has no {MANIFEST}; refusing to "
                              "write into it")

    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed preparation; never a finished set
    os.makedirs(tmp)
    try:
        manifest = _write_prepared(config, record, tmp)
    except BaseException:  # a failed preparation leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    logging.info("Prepared %s: %d clean + %d low-quality images in %s", manifest["source_name"],
                 manifest["counts"]["clean"], manifest["counts"]["noisy"], out)
    return manifest


def with_output_dir(config, workdir: str):
    """``config`` with corrupt.output_dir defaulting to ``workdir/data`` (a copy when changed)."""
    if config.corrupt.output_dir:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.corrupt.output_dir = os.path.join(os.path.abspath(workdir), "data")
    return config


def prepare_on_main_process(config) -> None:
    """``prepare`` on process 0 while the other processes wait for it."""
    if jax.process_index() == 0:
        prepare(config)
    devices.sync_processes("prepare")


def main(argv):
    del argv
    from absl import flags

    prepare(flags.FLAGS.config)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from sfbd_jax import cli

    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                    lock_config=True)
    flags.mark_flags_as_required(["config"])
    cli.run(main, lambda: flags.FLAGS.config.corrupt.output_dir or None)
