"""A small CNN classifier trained once on the clean data: its penultimate features stand in for
Inception's on MNIST-sized data (where Inception does not fit), and its predictions score
class-conditional samples.

``load_or_train`` caches the trained weights under ``<cache_dir>/classifier/<fingerprint>/``
(params.msgpack + meta.json with the held-out test accuracy). The fingerprint covers the
classifier's config and the exact training images and labels, so a changed data set or
setting trains a new classifier instead of silently reusing the old one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization

from sfbd_jax.data.sources import ImageDataset
from sfbd_jax.utils import integrity, jsonfile


class SmallCNN(nn.Module):
    """Images (B, H, W, C) in [-1, 1] → (features (B, feature_dim), logits (B, num_classes))."""

    num_classes: int
    width: int = 16
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x):
        for i, mult in enumerate((1, 2, 4)):
            x = nn.Conv(self.width * mult, (3, 3), strides=(1, 1) if i == 0 else (2, 2))(x)
            x = nn.gelu(nn.LayerNorm()(x))
        x = jnp.mean(x, axis=(1, 2))
        features = nn.gelu(nn.Dense(self.feature_dim)(x))
        return features, nn.Dense(self.num_classes)(features)


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A trained classifier; ``apply(params, images) -> (features, logits)`` is pure (for
    ``features.sharded_apply``), ``features``/``predict`` run it on host arrays."""

    model: SmallCNN
    params: dict
    meta: dict

    def apply(self, params, images):
        return self.model.apply({"params": params}, images)

    def _run(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        outs = [_apply(self.model, self.params, jnp.asarray(images[i:i + batch_size]))
                for i in range(0, len(images), batch_size)]
        return (np.concatenate([np.asarray(f) for f, _ in outs]),
                np.concatenate([np.asarray(g) for _, g in outs]))

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) in [-1, 1] → (N, feature_dim)."""
        return self._run(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) in [-1, 1] → predicted classes (N,)."""
        return np.argmax(self._run(images)[1], axis=-1)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) in [-1, 1] → class probabilities (N, num_classes), rows summing to 1."""
        return np.asarray(jax.nn.softmax(jnp.asarray(self._run(images)[1]), axis=-1))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: SmallCNN, params, images):
    return model.apply({"params": params}, images)


def fingerprint(cfg, dataset: ImageDataset) -> str:
    """Hash of the classifier settings and the training data (images and labels)."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    digest.update(np.ascontiguousarray(dataset.images, np.float32).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels, np.int64).tobytes())
    return digest.hexdigest()[:16]


def _split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def train(cfg, dataset: ImageDataset) -> Classifier:
    """Train on a seeded split of ``dataset`` (AdamW with cosine decay, cross-entropy, random
    pixel shifts) and measure accuracy on the held-out part."""
    if dataset.labels is None or dataset.num_classes < 2:
        raise ValueError(f"the feature classifier needs a labelled data set; {dataset.name} has "
                         "no labels. It serves config.eval.metrics 'classifier_fd' and, without "
                         "eval.inception_weights, memorisation/precision_recall/"
                         "density_coverage: set eval.inception_weights, or keep to swd")
    model = SmallCNN(dataset.num_classes, cfg.width, cfg.feature_dim)
    train_idx, test_idx = _split(len(dataset), cfg.test_fraction, cfg.seed)
    key = jax.random.PRNGKey(cfg.seed)
    params = model.init(key, jnp.zeros((1, *dataset.images.shape[1:])))["params"]
    schedule = optax.cosine_decay_schedule(cfg.lr, cfg.steps)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, labels, key):
        shift = jax.random.randint(key, (2,), -cfg.max_shift, cfg.max_shift + 1)
        images = jnp.roll(images, shift, axis=(1, 2))

        def loss_fn(p):
            _, logits = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    start = time.time()
    for i in range(cfg.steps):
        idx = train_idx[rng.integers(0, len(train_idx), cfg.batch_size)]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(dataset.images[idx]),
                                       jnp.asarray(dataset.labels[idx]),
                                       jax.random.fold_in(key, i))
    classifier = Classifier(model, params, {})
    accuracy = float(np.mean(classifier.predict(dataset.images[test_idx])
                             == dataset.labels[test_idx]))
    meta = {"test_accuracy": accuracy, "test_count": int(len(test_idx)),
            "train_count": int(len(train_idx)), "final_loss": float(loss),
            "data": dataset.name, "config": cfg.to_dict(), "train_seconds": time.time() - start}
    logging.info("Feature classifier trained on %d images of %s: held-out accuracy %.4f.",
                 len(train_idx), dataset.name, accuracy)
    return Classifier(model, params, meta)


def load_or_train(cfg, dataset: ImageDataset, cache_dir: str) -> Classifier:
    """The cached classifier for (cfg, dataset), training and caching it on first use."""
    directory = os.path.join(cache_dir, "classifier", fingerprint(cfg, dataset))
    params_path, meta_path = (os.path.join(directory, n) for n in ("params.msgpack", "meta.json"))
    model = SmallCNN(dataset.num_classes, cfg.width, cfg.feature_dim)
    if os.path.exists(meta_path):
        template = model.init(jax.random.PRNGKey(0),
                              jnp.zeros((1, *dataset.images.shape[1:])))["params"]
        try:
            integrity.verify_record(directory)
            with open(params_path, "rb") as f:
                params = serialization.from_bytes(template, f.read())
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"the cached feature classifier in {directory} is unreadable "
                             f"({err}); delete that directory to retrain it") from err
        meta = jsonfile.read_json(meta_path, None)
        logging.info("Feature classifier from cache %s (held-out accuracy %.4f).", directory,
                     meta["test_accuracy"])
        return Classifier(model, params, dict(meta, cached=True))
    logging.info("Training the feature classifier on %s (%d steps; once: it is cached in %s).",
                 dataset.name, cfg.steps, directory)
    classifier = train(cfg, dataset)
    if jax.process_index() == 0:
        _write_cache(directory, classifier)
    return Classifier(classifier.model, classifier.params, dict(classifier.meta, cached=False))


def _write_cache(directory: str, classifier: Classifier) -> None:
    """Write the classifier into a private directory, then rename it into place in one step:
    runs that share the cache (several seeds at once, parallel tests) never see a half-written
    one; when another run got there first, its (identical) copy is kept."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".staging-")
    try:
        with open(os.path.join(staging, "params.msgpack"), "wb") as f:
            f.write(serialization.to_bytes(jax.device_get(classifier.params)))
        jsonfile.write_json(os.path.join(staging, "meta.json"), classifier.meta)
        integrity.write_record(staging)
        try:
            os.rename(staging, directory)
        except OSError as err:
            if not os.path.exists(os.path.join(directory, "meta.json")):
                raise OSError(f"cannot cache the feature classifier in {directory}: it exists "
                              "without meta.json (left by an interrupted run?); delete that "
                              "directory") from err
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
