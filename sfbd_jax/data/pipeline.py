"""Deterministic, resumable batches placed as sharded global arrays, from a data set in memory
or read by index (memory-mapped shards, ``rows.ConcatenatedRows``), optionally made ahead by a
``Prefetcher`` thread.

Batch ``step`` holds examples ``perm_e[p mod N]`` for positions p = step·B … step·B + B − 1 of an
endless stream of epochs, ``e = p // N`` and ``perm_e`` a permutation seeded by (seed, e). The
batch for a step is therefore a pure function of (seed, step): resuming from a step count gives
the same batches, on any number of devices or hosts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.utils import devices


def validate_images(images: np.ndarray, expected_shape: tuple[int, int, int], name: str,
                    check_values: bool = True) -> None:
    """Raise a clear error unless ``images`` is (N, *expected_shape), finite and in [-1, 1].

    ``check_values=False`` checks the shape only (memory-mapped sets are checked per batch).
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected_shape):
        raise ValueError(f"data set {name!r}: images have shape {images.shape}, expected "
                         f"(N, {', '.join(map(str, expected_shape))}) from the config "
                         "(data.image_size, data.channels)")
    if images.shape[0] == 0:
        raise ValueError(f"data set {name!r} is empty")
    if not check_values:
        return
    if not np.all(np.isfinite(images)):
        raise ValueError(f"data set {name!r} contains NaN or infinite pixel values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(f"data set {name!r}: pixel values span [{lo:.4g}, {hi:.4g}], outside "
                         "[-1, 1]; images must be scaled as uint8 / 127.5 - 1")


def validate_labels(labels: np.ndarray | None, num_classes: int, name: str) -> None:
    """Raise a clear error unless ``labels`` are integer class indices in [0, num_classes) for
    a model with ``num_classes`` classes (out-of-range indices would read past the label
    embedding table)."""
    if labels is None:
        raise ValueError(f"the model is class-conditional (config.model.num_classes = "
                         f"{num_classes}) but data set {name!r} has no labels")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"data set {name!r}: labels must be a 1-D integer array, got "
                         f"{labels.dtype} of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"data set {name!r}: labels span [{labels.min()}, {labels.max()}] but "
                         f"the model has config.model.num_classes = {num_classes} classes "
                         f"(labels must lie in [0, {num_classes - 1}])")


class BatchIndexer:
    """Example indices of global batch ``step`` (see the module docstring)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if num_examples <= 0:
            raise ValueError("cannot draw batches from an empty data set")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._cache[epoch] = rng.permutation(self.num_examples)
        return self._cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        """(batch_size,) int64 indices of batch ``step``."""
        positions = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permutation(int(epoch))[offsets[sel]]
        return out


def flip_mask(seed: int, step: int, batch_size: int) -> np.ndarray:
    """(batch_size,) bools: which examples of global batch ``step`` are flipped horizontally."""
    return np.random.default_rng([seed, 0x5F11B, step]).random(batch_size) < 0.5


class TrainBatches:
    """Stacks of ``steps_per_dispatch`` global batches as sharded arrays over ``mesh``.

    Each host gathers only the rows its devices hold. Batches carry ``label`` when the
    model is class-conditional (``num_classes`` > 0, the labels checked against it). Rows of
    a set read by index (not an in-memory array) are checked per batch: finite, and in
    [-1, 1] unless ``unclipped`` (noisy values as stored).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, steps_per_dispatch: int,
                 seed: int, mesh, num_classes: int, random_flip: bool = False,
                 unclipped: bool = False):
        devices.check_divisible(batch_size, mesh)
        use_labels = num_classes > 0
        if use_labels:
            validate_labels(dataset.labels, num_classes, dataset.name)
        self.dataset = dataset
        self.indexer = BatchIndexer(len(dataset), batch_size, seed)
        self.steps_per_dispatch = steps_per_dispatch
        self.sharding = devices.batch_sharding(mesh, leading_axes=1)
        self.use_labels = use_labels
        self.random_flip = random_flip
        self.unclipped = unclipped
        self.seed = seed
        shape = (steps_per_dispatch, batch_size)
        self.rows = devices.process_rows(self.sharding, shape, axis=1)

    def draw(self, step: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Example indices (B,) of global batch ``step`` and per-example extras ({name: (B,)},
        placed into the batch as they are); subclasses draw differently."""
        return self.indexer.indices(step), {}

    def get(self, first_step: int) -> dict:
        """Batches for steps first_step … first_step + steps_per_dispatch − 1."""
        drawn = [self.draw(first_step + i) for i in range(self.steps_per_dispatch)]
        idx = np.stack([d[0] for d in drawn])
        global_shape = idx.shape
        local = idx[:, self.rows]
        images = self.dataset.images[local]
        if not isinstance(self.dataset.images, np.ndarray):  # lazily read: check each batch
            flat = images.reshape(-1, *images.shape[2:])
            validate_images(flat, images.shape[2:], self.dataset.name,
                            check_values=not self.unclipped)
            if self.unclipped and not np.all(np.isfinite(flat)):
                raise ValueError(f"data set {self.dataset.name!r} contains NaN or infinite "
                                 "pixel values")
            images = images.astype(np.float32)
        if self.random_flip:
            flips = np.stack([flip_mask(self.seed, first_step + i, idx.shape[1])[self.rows]
                              for i in range(self.steps_per_dispatch)])
            images = np.where(flips[:, :, None, None, None], images[:, :, :, ::-1], images)
        out = {"image": self._place(images, global_shape)}
        for name in drawn[0][1]:
            extra = np.stack([d[1][name] for d in drawn])
            out[name] = self._place(extra[:, self.rows], global_shape)
        if self.use_labels:
            out["label"] = self._place(self.dataset.labels[local], global_shape)
        return out

    def _place(self, local: np.ndarray, global_index_shape) -> jax.Array:
        global_shape = tuple(global_index_shape) + local.shape[2:]
        return jax.make_array_from_process_local_data(self.sharding, local, global_shape)


class Prefetcher:
    """The batches of a phase's dispatches, made ahead by one background thread.

    ``produce(first_step)`` (e.g. ``TrainBatches.get``: the host-side gather and the transfer to
    the devices) runs for ``first_steps`` in order, at most ``depth`` dispatches ahead of
    ``get``, while the devices compute. Batches are pure functions of the step, so what ``get``
    returns is what ``produce`` would return when called in its place: resume and 1-vs-N-host
    agreement are unchanged. An error in ``produce`` is raised by the ``get`` that wanted its
    batch. ``close`` (also on leaving a ``with`` block) stops the thread and waits for it.
    ``depth=0``: no thread, each batch made when asked. ``wait_seconds``: the time ``get`` spent
    blocked (the training loop's input wait).
    """

    THREAD_NAME = "sfbd-prefetch"

    def __init__(self, produce: Callable[[int], dict], first_steps: Iterable[int], depth: int):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._produce = produce
        self.depth = depth
        self.wait_seconds = 0.0
        self._thread = None
        if depth:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(iter(first_steps),),
                                            name=self.THREAD_NAME, daemon=True)
            self._thread.start()

    def _run(self, first_steps: Iterator[int]) -> None:
        for first_step in first_steps:
            try:
                item = (first_step, self._produce(first_step), None)
            except BaseException as err:  # handed to the consumer, which raises it
                item = (first_step, None, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, first_step: int) -> dict:
        """The batch of the dispatch starting at ``first_step`` (the next one in order)."""
        start = time.perf_counter()
        try:
            if self._thread is None:
                return self._produce(first_step)
            while True:
                try:
                    made_for, batch, err = self._queue.get(timeout=0.05)
                    break
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("the prefetch thread ended without the batch of "
                                           f"step {first_step}") from None
        finally:
            self.wait_seconds += time.perf_counter() - start
        if made_for != first_step:
            raise RuntimeError(f"prefetched the batch of step {made_for}, asked for "
                               f"{first_step}: dispatches must be taken in order")
        if err is not None:
            raise err
        return batch

    def close(self) -> None:
        """Stop the thread (dropping batches made ahead) and wait until it has ended."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting for room
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
