"""Several row-indexed image sets read as one, by index, without copying them.

SFBD's forward step trains on D^(k) ∪ D_clean (the clean subset possibly repeated): rather
than concatenating the denoised set with copies of the clean one in host memory, the union is
an index map over the parts, each of which may be an in-memory array or a memory-mapped
``shards.ShardedArray``; a batch gathers only its own rows, from whichever parts hold them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RowTransform = Callable[[np.ndarray], np.ndarray]


def locate_rows(index: np.ndarray, starts: np.ndarray, name: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(flat int64 row numbers, the part holding each) of an integer ``index`` array into
    parts that start at rows ``starts`` (their cumulative lengths, from 0); a clear error for
    a non-integer or out-of-range index."""
    if index.dtype == bool or not np.issubdtype(index.dtype, np.integer):
        raise TypeError(f"{name}: index with an integer array, got {index.dtype}")
    flat = index.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= starts[-1]):
        raise IndexError(f"{name}: index out of range for {int(starts[-1])} rows")
    return flat, np.searchsorted(starts, flat, side="right") - 1


class ConcatenatedRows:
    """Row-indexable ``parts`` (each of shape (N_j, *S)) as one array of N = Σ N_j rows.

    ``rows[indices]`` (an integer index array of any shape) returns float32 rows of shape
    (*indices.shape, *S): row i of the union is row i − start_j of the part j that holds it,
    with that part's ``transforms[j]`` applied (e.g. clipping denoised images to [-1, 1]; None:
    as stored). A part listed several times is read, not copied, each time.
    """

    def __init__(self, parts: Sequence, transforms: Sequence[RowTransform | None] | None = None,
                 name: str = "union"):
        if not parts:
            raise ValueError(f"{name}: a union needs at least one part")
        transforms = list(transforms) if transforms is not None else [None] * len(parts)
        if len(transforms) != len(parts):
            raise ValueError(f"{name}: {len(transforms)} transforms for {len(parts)} parts")
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"{name}: the parts' rows differ in shape: {sorted(shapes)}")
        self.parts, self.transforms, self.name = list(parts), transforms, name
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *shapes.pop())
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index)
        flat, which = locate_rows(index, self.starts, self.name)
        out = np.empty((flat.size, *self.shape[1:]), np.float32)
        for j in np.unique(which):
            sel = np.flatnonzero(which == j)
            rows = flat[sel] - self.starts[j]
            order = np.argsort(rows, kind="stable")  # ascending reads (memory maps)
            out[sel[order]] = self._read_part(int(j), rows[order])
        return out.reshape(*index.shape, *self.shape[1:])

    def all_rows(self) -> np.ndarray:
        """Every row, float32, in one host array: an explicit whole-set copy (small sets)."""
        return self[np.arange(len(self))]

    def __array__(self, dtype=None, copy=None):
        raise TypeError(f"{self.name}: a union read by index is never converted to one array "
                        "implicitly (that would copy the whole set into memory); index it, or "
                        "call .all_rows() where a whole copy is meant")

    def _read_part(self, j: int, rows: np.ndarray) -> np.ndarray:
        """Float32 rows ``rows`` (ascending) of part ``j``, its transform applied."""
        part_rows = np.asarray(self.parts[j][rows], np.float32)
        transform = self.transforms[j]
        return part_rows if transform is None else transform(part_rows)


def clip_to_image_range(rows: np.ndarray) -> np.ndarray:
    """Rows clipped to the image range [-1, 1] (denoised images may overshoot it)."""
    return np.clip(rows, -1.0, 1.0)
