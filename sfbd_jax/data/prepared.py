"""Reading a prepared (once-corrupted) data set for training: the clean subset and the noisy
set. The clean originals of the noisy images are *not* reachable from here (see
``eval_only.py``)."""

from __future__ import annotations

import numpy as np

from sfbd_jax.data import shards
from sfbd_jax.data.prepare import read_manifest
from sfbd_jax.data.sources import ImageDataset


class PreparedDataset:
    """A prepared data directory; every shard is checksum-verified when read. Images come out
    as float32 in [-1, 1] (noisy ones unclipped) whatever their storage (``pixels``).

    ``lazy=True`` keeps the images memory-mapped (``shards.ShardedArray``): batches then read
    only their own rows, so each host of a multi-host run reads only what its devices use, and
    only process 0 verifies the checksums (every process checks headers and row counts).
    """

    def __init__(self, directory: str, lazy: bool = False):
        self.directory = directory
        self.lazy = lazy
        self.manifest = read_manifest(directory)
        self.counts = self.manifest["counts"]
        self.num_classes = int(self.manifest["num_classes"])
        self.image_shape = tuple(self.manifest["image_shape"])

    def _part(self, group: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        entries = self.manifest["shards"][group]
        n = self.counts[group]
        if n == 0:
            return np.zeros((0, *self.image_shape), np.float32), None, np.zeros(0, np.int64)
        if self.lazy:
            import jax

            images = shards.ShardedArray(self.directory, entries["images"],
                                         verify=jax.process_index() == 0)
        else:
            images = shards.read_images(self.directory, entries["images"])
        labels = (shards.read_all(self.directory, entries["labels"])
                  if "labels" in entries else None)
        indices = shards.read_all(self.directory, entries["indices"])
        if len(images) != n or len(indices) != n:
            raise shards.CorruptShardError(
                f"{self.directory}: the {group} shards hold {len(images)} images, the "
                f"manifest counts {n}")
        return images, labels, indices

    def clean(self) -> ImageDataset:
        """The clean subset: images in [-1, 1]."""
        images, labels, _ = self._part("clean")
        return ImageDataset(images, labels, self.num_classes,
                            f"{self.manifest['source_name']}:clean")

    def noisy(self) -> tuple[ImageDataset, np.ndarray]:
        """The corrupted set (values unclipped) and the source index of each image."""
        images, labels, indices = self._part("noisy")
        return (ImageDataset(images, labels, self.num_classes,
                             f"{self.manifest['source_name']}:noisy"), indices)

    def noisy_types(self) -> np.ndarray | None:
        """A mixed set's component (index into ``manifest['mixture']``) of every noisy image,
        (N_noisy,) int32; None for a set of one corruption."""
        entries = self.manifest["shards"]["noisy"].get("types")
        if "mixture" not in self.manifest or not entries:
            return None
        return shards.read_all(self.directory, entries)
