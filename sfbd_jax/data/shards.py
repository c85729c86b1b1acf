"""Arrays on disk as checksummed ``.npy`` shards.

A shard entry in a manifest is {"file": relative path, "rows": int, "sha256": hex}. Reading
verifies the checksum and raises ``CorruptShardError`` naming the shard when it does not match
or the file cannot be parsed, and (for floating-point arrays) naming the rows when it holds NaN
or infinite values: a shard can be "valid" by its checksum and still unusable.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from sfbd_jax.data import pixels
from sfbd_jax.data import rows as rows_lib


class CorruptShardError(ValueError):
    """A shard file is missing, truncated or does not match its recorded checksum."""


class _HashingFile:
    """A binary file that hashes what is written to it (no copy of the data is kept)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)


def write_shard(directory: str, relative: str, array: np.ndarray) -> dict:
    """Write ``array`` to directory/relative as .npy; return its manifest entry. Streamed to
    the file and hashed on the way: no in-memory copy of the file's bytes."""
    path = os.path.join(directory, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        out = _HashingFile(f)
        np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return {"file": relative, "rows": int(array.shape[0]), "sha256": out.sha256.hexdigest()}


def open_for_writing(directory: str, relative: str, dtype, shape: tuple) -> np.memmap:
    """A writable memory-mapped ``.npy`` at directory/relative + '.partial' (file-backed pages:
    filling it costs no anonymous memory); ``commit`` it when it is filled."""
    path = os.path.join(directory, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return np.lib.format.open_memmap(path + ".partial", mode="w+", dtype=dtype, shape=shape)


def commit(directory: str, relative: str, array: np.memmap) -> dict:
    """Flush ``array`` (from ``open_for_writing``), hash its file in chunks and move it to
    directory/relative; returns its manifest entry."""
    array.flush()
    rows = int(array.shape[0])
    path = os.path.join(directory, relative)
    digest = hashlib.sha256()
    with open(path + ".partial", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    os.replace(path + ".partial", path)
    return {"file": relative, "rows": rows, "sha256": digest.hexdigest()}


def nonfinite_rows(array: np.ndarray) -> np.ndarray:
    """Positions of the rows of a floating-point ``array`` holding NaN or ±inf (none for other
    dtypes)."""
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(array).reshape(len(array), -1).all(axis=1))


def check_finite(array: np.ndarray, where: str, rows: np.ndarray | None = None) -> None:
    """Raise ``CorruptShardError`` naming ``where`` and the rows of ``array`` (their positions in
    the shard: ``rows[i]`` for row i when given) that hold NaN or infinite values."""
    bad = nonfinite_rows(array)
    if bad.size:
        named = bad if rows is None else np.asarray(rows)[bad]
        shown = ", ".join(str(r) for r in named[:10]) + (", …" if len(named) > 10 else "")
        raise CorruptShardError(f"shard {where} holds NaN or infinite values in {len(named)} "
                                f"row(s): {shown}. The data set cannot be trained on; prepare "
                                "it again into a fresh directory.")


def read_shard(directory: str, entry: dict, allow_inf: bool = False) -> np.ndarray:
    """Read and verify one shard (see module docstring); ``allow_inf``: +inf is a value (σ_min
    of an annotation: never at high noise), NaN and -inf still refused."""
    path = os.path.join(directory, entry["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CorruptShardError(f"shard {path} cannot be read: {err}") from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CorruptShardError(f"shard {path} is corrupt or truncated: sha256 {digest[:12]}… "
                                f"does not match the manifest's {entry['sha256'][:12]}… "
                                f"({len(data)} bytes on disk). Re-run the prepare command into "
                                "a fresh directory.")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise CorruptShardError(f"shard {path} is not a valid .npy file: {err}") from err
    if array.shape[0] != entry["rows"]:
        raise CorruptShardError(f"shard {path} holds {array.shape[0]} rows, the manifest says "
                                f"{entry['rows']}")
    check_finite(np.where(array == np.inf, 0, array) if allow_inf else array, path)
    return array


def read_all(directory: str, entries: list[dict]) -> np.ndarray:
    """Concatenate the verified shards ``entries`` in order."""
    return np.concatenate([read_shard(directory, e) for e in entries])


def verify_shard(directory: str, entry: dict) -> None:
    """Check one shard's checksum (reads the whole file)."""
    read_shard(directory, entry)


class ShardedArray(rows_lib.ConcatenatedRows):
    """The image rows of several ``.npy`` shards as one read-only float32 array, memory-mapped.

    ``array[indices]`` reads only the rows asked for (so on several hosts each host reads only
    the examples its own devices consume) and decodes them per batch (``pixels.decode``: uint8
    pixels → [-1, 1], float16 → float32); ``stored_dtype`` is what the shards hold. Opening
    checks every shard's .npy header and row count; ``verify=True`` also checks the checksums
    (reads every file once). The rows a batch reads are checked for NaN/inf there.
    """

    def __init__(self, directory: str, entries: list[dict], verify: bool = True):
        parts, self.paths = [], []
        for entry in entries:
            if verify:
                verify_shard(directory, entry)
            path = os.path.join(directory, entry["file"])
            try:
                part = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise CorruptShardError(f"shard {path} cannot be opened: {err}") from err
            if part.shape[0] != entry["rows"]:
                raise CorruptShardError(f"shard {path} holds {part.shape[0]} rows, the "
                                        f"manifest says {entry['rows']}")
            if part.dtype.name not in pixels.STORED_IMAGE_DTYPES:
                raise CorruptShardError(f"shard {path} holds {part.dtype} values; image shards "
                                        f"hold one of {pixels.STORED_IMAGE_DTYPES}")
            parts.append(part)
            self.paths.append(path)
        if not parts:
            raise ValueError("a sharded array needs at least one shard")
        super().__init__(parts, name="ShardedArray")
        self.stored_dtype = parts[0].dtype

    def _read_part(self, j: int, rows: np.ndarray) -> np.ndarray:
        stored = self.parts[j][rows]
        check_finite(stored, self.paths[j], rows)
        return pixels.decode(stored)


def read_images(directory: str, entries: list[dict]) -> np.ndarray:
    """The verified image shards ``entries`` in order, decoded to float32 (see ``pixels``)."""
    return np.concatenate([pixels.decode(read_shard(directory, e)) for e in entries])
