"""Distribution metrics of generated images against the clean data set (config.eval).

Metrics (``config.eval.metrics``, comma-separated):
    fid            Fréchet distance of FID Inception-v3 pool features (needs converted weights)
    kid            kernel Inception distance (mean and std over subsets), same features
    classifier_fd  Fréchet distance of the project classifier's features (MNIST-sized data)
    swd            sliced 1-Wasserstein distance in pixel space ([-1, 1] scale)

The reference is the clean data set of ``config.data`` (for SFBD: the originals of every image,
corrupted or not), at most ``eval.reference_max`` images drawn with a fixed seed. Its feature
statistics are computed once and cached under ``eval.cache_dir`` keyed by the extractor's
weights and the exact reference images.
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import numpy as np
from absl import logging

from sfbd_jax.config_checks import KNOWN_METRICS, parse_metrics
from sfbd_jax.data import sources
from sfbd_jax.evaluation import distances, features
from sfbd_jax.utils import jsonfile

_INCEPTION_METRICS = ("fid", "kid")
_STREAM_EVAL = 3  # PRNG stream of config.seed for evaluation samples (training uses 0-2)


def evaluation_key(config) -> jax.Array:
    """The fixed key of evaluation samples (the same for every checkpoint of a run)."""
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), _STREAM_EVAL)



def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "sfbd_jax")


def reference_dataset(config) -> sources.ImageDataset:
    """The clean data set of config.data, subsampled to eval.reference_max (seeded)."""
    data = sources.load_source(config.data)
    limit = config.eval.reference_max
    if 0 < limit < len(data):
        keep = np.sort(np.random.default_rng(config.eval.reference_seed).choice(
            len(data), limit, replace=False))
        labels = None if data.labels is None else data.labels[keep]
        data = sources.ImageDataset(data.images[keep], labels, data.num_classes, data.name)
    return data


def _images_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images, np.float32).tobytes()).hexdigest()[:16]


class Evaluator:
    """Computes ``config.eval.metrics`` of image sets against the cached reference."""

    def __init__(self, config, mesh, reference: sources.ImageDataset | None = None):
        cfg = config.eval
        self.config = config
        self.metrics = parse_metrics(cfg.metrics)
        if not self.metrics:
            raise ValueError(f"config.eval.metrics is empty: name at least one of {KNOWN_METRICS}")
        self.cache_dir = cfg.cache_dir or default_cache_dir()
        self.reference = reference if reference is not None else reference_dataset(config)
        expected = (config.data.image_size, config.data.image_size, config.data.channels)
        if self.reference.images.shape[1:] != expected:
            raise ValueError(f"reference images have shape {self.reference.images.shape[1:]}, "
                             f"the model makes {expected}")
        self.extractors: list[features.Extractor] = []
        if any(m in _INCEPTION_METRICS for m in self.metrics):
            self.extractors.append(features.inception_extractor(cfg.inception_weights, mesh,
                                                                cfg.batch_size))
        if "classifier_fd" in self.metrics:
            self.extractors.append(features.classifier_extractor(
                cfg.classifier, self.reference, self.cache_dir, mesh, cfg.batch_size))
        self._reference_stats = {e.name: self._load_or_compute_reference(e)
                                 for e in self.extractors}

    # ----- reference --------------------------------------------------------------------
    def _per_class(self, extractor: features.Extractor) -> bool:
        """Per-class reference statistics: for the classifier's features of labelled data."""
        return extractor.name == "classifier" and self.reference.labels is not None

    def _load_or_compute_reference(self, extractor: features.Extractor) -> dict:
        key = f"{extractor.name}-{extractor.fingerprint}-{_images_digest(self.reference.images)}"
        if self._per_class(extractor):
            key += "-perclass"
        path = os.path.join(self.cache_dir, "reference", key + ".npz")
        if os.path.exists(path):
            try:
                with np.load(path) as f:
                    stats = {k: f[k] for k in f.files}
            except (OSError, ValueError) as err:
                raise ValueError(f"cached reference statistics {path} are unreadable ({err}); "
                                 "delete the file to recompute them") from err
            logging.info("Reference statistics from cache %s.", path)
            return stats
        start = time.time()
        feats = extractor.features(self.reference.images)
        stats = _summarise(feats, self.config.eval.kid_reference_max)
        if self._per_class(extractor):
            stats.update(_class_stats(feats, self.reference.labels, self.reference.num_classes))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp.npz"
            np.savez(tmp, **stats)
            os.replace(tmp, path)
        logging.info("Reference statistics of %d images (%s) in %.1f s, cached at %s.",
                     len(feats), extractor.name, time.time() - start, path)
        return stats

    # ----- metrics ----------------------------------------------------------------------
    def evaluate(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict:
        """Metrics of ``images`` (N, H, W, C) in [-1, 1]. ``labels``: the classes the images
        were generated for (conditional models) → also the classifier's accuracy on them."""
        cfg = self.config.eval
        images = np.asarray(images, np.float32)
        if not np.all(np.isfinite(images)):
            raise FloatingPointError("generated images contain NaN/inf")
        result: dict = {"num_samples": int(len(images)),
                        "reference_count": int(len(self.reference))}
        for extractor in self.extractors:
            predicted = None
            if labels is not None and extractor.features_and_classes is not None:
                feats, predicted = extractor.features_and_classes(images)  # one pass
            else:
                feats = extractor.features(images)
            ref = self._reference_stats[extractor.name]
            stats = _summarise(feats, cfg.kid_reference_max)
            fd = distances.frechet_distance(stats["mu"], stats["cov"], ref["mu"], ref["cov"])
            if extractor.name == "inception":
                if "fid" in self.metrics:
                    result["fid"] = fd
                if "kid" in self.metrics:
                    result["kid"], result["kid_std"] = distances.kernel_inception_distance(
                        feats, ref["features"], num_subsets=cfg.kid_subsets,
                        subset_size=cfg.kid_subset_size, seed=cfg.reference_seed)
            else:
                result["classifier_fd"] = fd
                if predicted is not None:
                    result["sample_class_accuracy"] = float(
                        np.mean(predicted == np.asarray(labels)))
                if labels is not None and "class_mu" in ref:
                    result.update(_per_class_fd(feats, np.asarray(labels), ref))
            result.update(extractor.info)
        if "swd" in self.metrics:
            result["swd"] = distances.sliced_wasserstein(
                images, self.reference.images, num_projections=cfg.swd_projections,
                seed=cfg.reference_seed)
        return result

    def evaluate_model(self, experiment, params, num: int, key: jax.Array) -> dict:
        """Generate ``num`` images from ``params`` with the experiment's sampler (batches of
        eval.batch_size, progress logged) and evaluate them."""
        batch = self.config.eval.batch_size
        labels = experiment.sample_labels(num)
        out, start = [], time.time()
        for i, first in enumerate(range(0, num, batch)):
            count = min(batch, num - first)
            batch_labels = None if labels is None else labels[first:first + count]
            if batch_labels is not None:  # full batches only: one compilation
                batch_labels = np.resize(batch_labels, batch)
            images = experiment.generate(params, batch, jax.random.fold_in(key, i),
                                         batch_labels)
            out.append(images[:count])
            done = first + count
            if done == num or (i + 1) % 10 == 0:
                logging.info("Evaluation: generated %d/%d images (%.1f images/s).", done, num,
                             done / (time.time() - start))
        samples = np.concatenate(out)
        result = self.evaluate(samples, labels)
        result["generate_seconds"] = time.time() - start
        return result


def _summarise(feats: np.ndarray, keep: int) -> dict:
    """Mean, covariance and (for KID) at most ``keep`` of the features, drawn at random (data
    sets can be sorted by class)."""
    stats = distances.FeatureStats(feats.shape[1])
    stats.update(feats)
    mu, cov = stats.mean_cov()
    if len(feats) > keep:
        feats = feats[np.sort(np.random.default_rng(0).choice(len(feats), keep, replace=False))]
    return {"mu": mu, "cov": cov, "features": feats.astype(np.float32),
            "count": np.asarray(stats.count)}


def _class_stats(feats: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Per-class feature mean (K, D) and covariance (K, D, D) of the reference."""
    mus, covs, counts = [], [], []
    for k in range(num_classes):
        sel = feats[np.asarray(labels) == k]
        stats = distances.FeatureStats(feats.shape[1])
        if len(sel):
            stats.update(sel)
        mu, cov = stats.mean_cov() if len(sel) > 1 else (np.zeros(feats.shape[1]),
                                                         np.zeros((feats.shape[1],) * 2))
        mus.append(mu)
        covs.append(cov)
        counts.append(len(sel))
    return {"class_mu": np.stack(mus), "class_cov": np.stack(covs),
            "class_count": np.asarray(counts)}


def _per_class_fd(feats: np.ndarray, labels: np.ndarray, ref: dict) -> dict:
    """Classifier-feature Fréchet distance of the samples of each class against the reference
    images of that class, and their mean over the classes with ≥ 2 samples and references
    (with few samples per class the covariance is noisy: compare rows at equal counts)."""
    per_class = []
    for k in range(len(ref["class_mu"])):
        sel = feats[labels == k]
        if len(sel) < 2 or ref["class_count"][k] < 2:
            per_class.append(None)
            continue
        stats = distances.FeatureStats(feats.shape[1])
        stats.update(sel)
        mu, cov = stats.mean_cov()
        per_class.append(distances.frechet_distance(mu, cov, ref["class_mu"][k],
                                                    ref["class_cov"][k]))
    valid = [v for v in per_class if v is not None]
    return {"classifier_fd_per_class": per_class,
            "classifier_fd_class_mean": float(np.mean(valid)) if valid else float("nan")}


def write_result(workdir: str, tag: str, result: dict) -> str:
    """Record a result as ``workdir/eval/<tag>.json`` (process 0)."""
    path = os.path.join(workdir, "eval", f"{tag}.json")
    if jax.process_index() == 0:
        jsonfile.write_json(path, result)
    return path
