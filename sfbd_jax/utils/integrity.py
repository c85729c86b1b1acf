"""Integrity records: sha256 checksums of files a run writes and later restores.

A directory record (``RECORD`` inside the directory) lists every file under it with its size
and sha256; it is written once the directory is complete (after an Orbax save has finished,
after a classifier's files are written) and verified before anything in it is read back. A
single file gets a ``<file>.sha256`` side-car instead. Verification reads every byte (sha256
runs at ~1.5 GB/s on one core), so a flipped byte anywhere is found, not only the structural
damage that the readers themselves notice. Nothing here deletes or repairs a file.
"""

from __future__ import annotations

import hashlib
import json
import os

RECORD = "sfbd_integrity.json"
SIDECAR = ".sha256"
_CHUNK = 8 << 20


class IntegrityError(ValueError):
    """A file does not match its integrity record (changed, truncated or missing)."""


def digest_file(path: str) -> str:
    """sha256 (hex) of the file at ``path``, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(directory: str) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != RECORD and not rel.endswith(".tmp"):
                found.append(rel)
    return sorted(found)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_record(directory: str) -> dict:
    """Record the size and sha256 of every file under ``directory`` (atomically, in
    ``directory/RECORD``); returns the record."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(directory, rel)),
                   "sha256": digest_file(os.path.join(directory, rel))}
             for rel in _files_under(directory)}
    record = {"algorithm": "sha256", "files": files}
    _write_atomically(os.path.join(directory, RECORD), json.dumps(record, indent=1))
    return record


def has_record(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, RECORD))


def verify_record(directory: str) -> bool:
    """Check every file listed in ``directory``'s record; False when there is no record.

    Raises ``IntegrityError`` listing every file that is missing, of another size or of another
    checksum (all of them, not the first only)."""
    path = os.path.join(directory, RECORD)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as err:
        raise IntegrityError(f"the integrity record {path} cannot be read ({err})") from err
    problems = []
    for rel, expected in files.items():
        full = os.path.join(directory, rel)
        if not os.path.exists(full):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(full) != expected["bytes"]:
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, recorded "
                            f"{expected['bytes']}")
        elif digest_file(full) != expected["sha256"]:
            problems.append(f"{rel}: contents changed (sha256 differs from the record)")
    if problems:
        raise IntegrityError(f"{len(problems)} file(s) in {directory} do not match {RECORD}: "
                             + "; ".join(problems))
    return True


def write_sidecar(path: str) -> None:
    """Write ``path + SIDECAR`` holding the file's sha256."""
    _write_atomically(path + SIDECAR, digest_file(path) + "\n")


def verify_sidecar(path: str) -> bool:
    """Check ``path`` against its side-car; False when it has none, ``IntegrityError`` on a
    mismatch."""
    sidecar = path + SIDECAR
    if not os.path.exists(sidecar):
        return False
    with open(sidecar) as f:
        expected = f.read().strip()
    if digest_file(path) != expected:
        raise IntegrityError(f"{path} does not match its checksum in {sidecar}: the file was "
                             "changed or damaged after it was written")
    return True


def tree_digest(tree) -> str:
    """sha256 (hex, 16 digits) of the leaves of a pytree of arrays (shapes, dtypes and bytes,
    in tree order): identifies e.g. the parameters a cached product was made with."""
    import jax
    import numpy as np

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{leaf.shape}{leaf.dtype}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]
