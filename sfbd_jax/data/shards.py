"""Arrays on disk as checksummed ``.npy`` shards.

A shard entry in a manifest is {"file": relative path, "rows": int, "sha256": hex}. Reading
verifies the checksum and raises ``CorruptShardError`` naming the shard when it does not match
or the file cannot be parsed.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np


class CorruptShardError(ValueError):
    """A shard file is missing, truncated or does not match its recorded checksum."""


def write_shard(directory: str, relative: str, array: np.ndarray) -> dict:
    """Write ``array`` to directory/relative as .npy; return its manifest entry."""
    path = os.path.join(directory, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return {"file": relative, "rows": int(array.shape[0]),
            "sha256": hashlib.sha256(data).hexdigest()}


def read_shard(directory: str, entry: dict) -> np.ndarray:
    """Read and verify one shard (see module docstring)."""
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
    return array


def read_all(directory: str, entries: list[dict]) -> np.ndarray:
    """Concatenate the verified shards ``entries`` in order."""
    return np.concatenate([read_shard(directory, e) for e in entries])
