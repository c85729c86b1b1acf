"""Feature extractors for the distribution metrics, run batch-sharded over the device mesh.

An ``Extractor`` maps images (N, H, W, C) in [-1, 1] to features (N, D) on the host. Two kinds:
``inception`` (FID/KID: the 2048-d pool features of the FID Inception-v3) and ``classifier``
(the project's small classifier trained on the clean data, for MNIST-sized images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.evaluation import classifier as classifier_lib
from sfbd_jax.evaluation import inception
from sfbd_jax.utils import devices


def sharded_apply(apply_fn: Callable, variables, mesh, batch_size: int) -> Callable:
    """``images -> apply_fn(variables, images)`` over host arrays of any length: fixed-size
    batches (the last one padded, so one compilation) split over ``mesh``'s ``data`` axis.
    ``apply_fn`` returns an array or a tuple of arrays, each with the batch as leading axis;
    the result has the same structure, as host arrays."""
    devices.check_divisible(batch_size, mesh, "config.eval.batch_size")
    batch = devices.batch_sharding(mesh)
    jitted = jax.jit(apply_fn, in_shardings=(devices.replicated(mesh), batch),
                     out_shardings=batch)
    variables = jax.tree.map(lambda v: devices.put_global(v, devices.replicated(mesh)),
                             jax.device_get(variables))

    def run(images: np.ndarray):
        outs = []
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start:start + batch_size], np.float32)
            padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                                     np.float32)])
            out = jitted(variables, devices.put_global(padded, batch))
            n = len(chunk)
            outs.append(jax.tree.map(lambda a, n=n: devices.to_host(a)[:n], out))
        return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)

    return run


@dataclasses.dataclass(frozen=True)
class Extractor:
    """name: 'inception' | 'classifier'; fingerprint: identifies the weights (cache key);
    features: images → (N, dim); info: facts to report (e.g. the classifier's accuracy);
    features_and_classes: images → ((N, dim) features, (N,) predicted classes, (N,) the
    predicted class's softmax probability) in one pass, for extractors that classify."""

    name: str
    dim: int
    fingerprint: str
    features: Callable[[np.ndarray], np.ndarray]
    info: dict
    features_and_classes: Callable[[np.ndarray], tuple[np.ndarray, ...]] | None = None


def inception_extractor(weights_path: str, mesh, batch_size: int) -> Extractor:
    """FID Inception-v3 from converted weights (clear error when the file is missing)."""
    variables = inception.load_variables(weights_path)
    run = sharded_apply(inception.InceptionV3().apply, variables, mesh, batch_size)
    return Extractor("inception", inception.FEATURE_DIM,
                     inception.file_fingerprint(weights_path)[:16], run,
                     {"inception_weights": weights_path})


def classifier_extractor(cfg, reference: ImageDataset, cache_dir: str, mesh,
                         batch_size: int) -> Extractor:
    """Penultimate features of the classifier trained (once, cached) on ``reference``."""
    clf = classifier_lib.load_or_train(cfg, reference, cache_dir)
    run = sharded_apply(lambda p, x: clf.apply(p, x)[0], clf.params, mesh, batch_size)

    def with_classes(params, images):
        feats, logits = clf.apply(params, images)
        return (feats, jax.numpy.argmax(logits, axis=-1),
                jax.numpy.max(jax.nn.softmax(logits, axis=-1), axis=-1))

    both = sharded_apply(with_classes, clf.params, mesh, batch_size)
    return Extractor("classifier", cfg.feature_dim, classifier_lib.fingerprint(cfg, reference),
                     run, {"classifier_test_accuracy": clf.meta["test_accuracy"]},
                     features_and_classes=both)
