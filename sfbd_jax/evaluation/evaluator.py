"""Distribution metrics of generated images against the clean data set (config.eval).

Metrics (``config.eval.metrics``, comma-separated):
    fid            Fréchet distance of FID Inception-v3 pool features (needs converted weights)
    kid            kernel Inception distance (mean and std over subsets), same features
    classifier_fd  Fréchet distance of the project classifier's features (MNIST-sized data);
                   also the classifier's mean confidence in the samples (its top softmax
                   probability) and the fraction it classifies with probability ≥ 0.9: how
                   many samples it recognises as a class
    swd            sliced 1-Wasserstein distance in pixel space ([-1, 1] scale)
    noise          residual pixel noise: the mean over samples of each one's wavelet (Haar
                   MAD) estimate of white-noise σ on the [-1, 1] scale (``noise_level``), and
                   the same of the reference images (``noise_sigma_reference``, ~0 for clean
                   data): sees corruption left in the samples that FD and SWD miss
    memorisation   nearest and second-nearest training image of every sample, in pixels and
                   in the evaluation features: the fraction memorised (d1/d2 below
                   eval.memorisation_threshold) and the median d1 against that of real images
                   outside the training set (``neighbours.memorisation``), against the run's
                   training images (``train``: e.g. SFBD's clean subset) and against the whole
                   clean reference (``data``); for ``train``, also copy_ratio: the samples'
                   median d1 to the training set over that to an equally large held-out set
    precision_recall, density_coverage
                   k-NN manifold metrics in the evaluation features (``neighbours``)

The evaluation features are Inception's pool features when ``eval.inception_weights`` is set,
the feature classifier's otherwise.

The reference is the clean data set of ``config.data`` (for SFBD: the originals of every image,
corrupted or not), at most ``eval.reference_max`` images drawn with a fixed seed. Its feature
statistics (and all its features, for the neighbour metrics) are computed once and cached under
``eval.cache_dir`` keyed by the extractor's weights and the exact reference images.
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
from sfbd_jax.evaluation import distances, features, neighbours, noise_level
from sfbd_jax.evaluation.training_sets import TrainingImages
from sfbd_jax.utils import images as images_lib
from sfbd_jax.utils import integrity, jsonfile
from sfbd_jax.utils import progress as progress_lib

_INCEPTION_METRICS = ("fid", "kid")
_NEIGHBOUR_METRICS = ("memorisation", "precision_recall", "density_coverage")
CONFIDENT_PROBABILITY = 0.9  # a sample the classifier "recognises": top softmax ≥ this
# Fewer real images than this outside the training set: the memorisation baseline is the
# training images' leave-one-out nearest neighbour instead (a median over too few is noise).
_MIN_OUTSIDE = 50
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


def rows_outside(reference: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Indices of the ``reference`` images that are not (bit for bit) in ``train``."""
    def digest(row):
        return hashlib.blake2b(np.ascontiguousarray(row, np.float32).tobytes(),
                               digest_size=16).digest()

    seen = {digest(row) for row in train}
    return np.asarray([i for i, row in enumerate(reference) if digest(row) not in seen],
                      np.int64)


def _seeded_subset(count: int, limit: int, seed: int) -> np.ndarray:
    """``min(count, limit)`` sorted indices of ``range(count)``, drawn with ``seed``."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


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
        neighbour_metrics = any(m in _NEIGHBOUR_METRICS for m in self.metrics)
        # The features of the neighbour metrics: Inception's when its weights are given.
        self.neighbour_space = ("inception" if cfg.inception_weights else "classifier"
                                ) if neighbour_metrics else None
        self.extractors: list[features.Extractor] = []
        if (any(m in _INCEPTION_METRICS for m in self.metrics)
                or self.neighbour_space == "inception"):
            self.extractors.append(features.inception_extractor(cfg.inception_weights, mesh,
                                                                cfg.batch_size))
        if "classifier_fd" in self.metrics or self.neighbour_space == "classifier":
            self.extractors.append(features.classifier_extractor(
                cfg.classifier, self.reference, self.cache_dir, mesh, cfg.batch_size))
        self._noise_sigma_reference: float | None = None  # 'noise': computed on first use
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
                integrity.verify_sidecar(path)
                with np.load(path) as f:
                    stats = {k: f[k] for k in f.files}
            except (OSError, ValueError) as err:
                raise ValueError(f"cached reference statistics {path} are unreadable ({err}); "
                                 "delete the file to recompute them") from err
            if "features_all" in stats:
                logging.info("Reference statistics from cache %s.", path)
                return stats
            logging.info("Cached reference statistics %s predate the neighbour metrics (no "
                         "features_all): recomputing them.", path)
        start = time.time()
        feats = extractor.features(self.reference.images)
        stats = _summarise(feats, self.config.eval.kid_reference_max)
        stats["features_all"] = feats.astype(np.float32)
        if self._per_class(extractor):
            stats.update(_class_stats(feats, self.reference.labels, self.reference.num_classes))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npz"  # private: concurrent runs share the cache
            np.savez(tmp, **stats)
            os.replace(tmp, path)
            integrity.write_sidecar(path)
        logging.info("Reference statistics of %d images (%s) in %.1f s, cached at %s.",
                     len(feats), extractor.name, time.time() - start, path)
        return stats

    # ----- metrics ----------------------------------------------------------------------
    def evaluate(self, images: np.ndarray, labels: np.ndarray | None = None,
                 train: TrainingImages | None = None, copies_path: str | None = None) -> dict:
        """Metrics of ``images`` (N, H, W, C) in [-1, 1]. ``labels``: the classes the images
        were generated for (conditional models) → also the classifier's accuracy on them.
        ``train``: the clean images the model was trained on (memorisation is measured against
        them and against the whole reference); ``copies_path``: a PNG of the most-copied
        samples (top row) above their nearest training images (bottom row)."""
        cfg = self.config.eval
        images = np.asarray(images, np.float32)
        if not np.all(np.isfinite(images)):
            raise FloatingPointError("generated images contain NaN/inf")
        result: dict = {"num_samples": int(len(images)),
                        "reference_count": int(len(self.reference))}
        for extractor in self.extractors:
            predicted = confidence = None
            if extractor.features_and_classes is not None:
                feats, predicted, confidence = extractor.features_and_classes(images)  # 1 pass
            else:
                feats = extractor.features(images)
            if extractor.name == self.neighbour_space:
                result.update(self._neighbour_metrics(images, feats, extractor, train,
                                                      copies_path))
            if extractor.name == "inception" and not any(m in _INCEPTION_METRICS
                                                         for m in self.metrics):
                continue  # built for the neighbour metrics only
            if extractor.name == "classifier" and "classifier_fd" not in self.metrics:
                continue
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
                if confidence is not None:
                    confidence = np.asarray(confidence, np.float64)
                    result["classifier_confidence"] = float(np.mean(confidence))
                    result["confident_fraction"] = float(np.mean(
                        confidence >= CONFIDENT_PROBABILITY))
                if predicted is not None and labels is not None:
                    result["sample_class_accuracy"] = float(
                        np.mean(predicted == np.asarray(labels)))
                if labels is not None and "class_mu" in ref:
                    result.update(_per_class_fd(feats, np.asarray(labels), ref))
            result.update(extractor.info)
        if "swd" in self.metrics:
            result["swd"] = distances.sliced_wasserstein(
                images, self.reference.images, num_projections=cfg.swd_projections,
                seed=cfg.reference_seed)
        if "noise" in self.metrics:
            result["noise_sigma"] = float(np.mean(noise_level.noise_sigma(images)))
            result["noise_sigma_reference"] = self._reference_noise_sigma()
        return result

    def _reference_noise_sigma(self) -> float:
        """The reference images' mean noise estimate (computed once, a few seconds)."""
        if self._noise_sigma_reference is None:
            self._noise_sigma_reference = float(np.mean(
                noise_level.noise_sigma(self.reference.images)))
        return self._noise_sigma_reference

    def _neighbour_metrics(self, images: np.ndarray, feats: np.ndarray,
                           extractor: features.Extractor, train: TrainingImages | None,
                           copies_path: str | None) -> dict:
        """memorisation / precision_recall / density_coverage of one sample set."""
        cfg = self.config.eval
        ref_feats = self._reference_stats[extractor.name]["features_all"]
        out: dict = {"neighbour_features": extractor.name}
        if "memorisation" in self.metrics:
            out.update(self._memorisation(images, feats, extractor, ref_feats, train,
                                          copies_path))
        wanted = [m for m in ("precision_recall", "density_coverage") if m in self.metrics]
        if wanted:
            # Equal numbers of real and generated features (as both papers): with fewer
            # samples than references the generated k-NN balls grow and recall is inflated,
            # while most real balls stay empty and coverage is deflated.
            count = min(len(ref_feats), len(feats), cfg.prdc_max)
            real = ref_feats[_seeded_subset(len(ref_feats), count, cfg.reference_seed)]
            fake = feats[_seeded_subset(len(feats), count, cfg.reference_seed + 1)]
            found = neighbours.manifold_metrics(real, fake, pr_k=cfg.pr_k, dc_k=cfg.dc_k,
                                                block_elements=cfg.block_elements)
            for metric in wanted:
                for name in metric.split("_"):
                    out[name] = found[name]
            out["prdc_counts"] = [int(len(real)), int(len(fake))]
        return out

    def _memorisation(self, images, feats, extractor, ref_feats, train, copies_path) -> dict:
        """Against ``train`` (if given) and against the whole reference ('data'), in pixels
        and in features; keys <summary>_<set>_<space>."""
        cfg = self.config.eval
        reference = self.reference.images
        sets = [("data", reference, ref_feats, None)]
        out: dict = {}
        # A training set that is the reference (e.g. the oracle's) is measured once, as 'train',
        # and reported under both names: no second feature pass, no second neighbour search.
        same = False
        if train is not None:
            if len(train) < 2:
                raise ValueError(f"memorisation needs at least 2 training images; the run's "
                                 f"training set {train.name!r} has {len(train)}")
            out.update(train_set=train.name, train_count=int(len(train)))
            same = _images_digest(train.images) == _images_digest(reference)
            if same:
                sets = [("train", reference, ref_feats, None)]
            else:
                outside = rows_outside(reference, train.images)
                if len(outside) < _MIN_OUTSIDE:
                    outside = None
                else:
                    outside = outside[_seeded_subset(len(outside), cfg.heldout_max,
                                                     cfg.reference_seed)]
                sets.insert(0, ("train", np.asarray(train.images, np.float32),
                                extractor.features(train.images), outside))
        for set_name, set_images, set_feats, outside in sets:
            for space, sample_rows, train_rows, ref_rows in (
                    ("pixel", images, set_images, reference), ("features", feats, set_feats,
                                                               ref_feats)):
                mem = neighbours.memorisation(
                    sample_rows, train_rows, None if outside is None else ref_rows[outside],
                    threshold=cfg.memorisation_threshold, block_elements=cfg.block_elements)
                summary = mem.summary()
                for key in ("memorised_fraction", "median_d1", "median_d1_heldout",
                            "d1_ratio"):
                    out[f"{key}_{set_name}_{space}"] = summary[key]
                out[f"heldout_{set_name}"] = f"{summary['heldout']} ({summary['heldout_count']})"
                if outside is not None and len(outside) >= len(train_rows):
                    # The samples' nearest-neighbour distance to the training set over that to
                    # an equally large set of real images never trained on: ≈ 1 when the model
                    # generalises, < 1 when it copies — whatever the samples' quality, which
                    # moves both distances alike.
                    twin = outside[_seeded_subset(len(outside), len(train_rows),
                                                  cfg.reference_seed + 2)]
                    to_twin = neighbours.k_nearest(sample_rows, ref_rows[twin], 1,
                                                   block_elements=cfg.block_elements)[0]
                    out[f"copy_ratio_{set_name}_{space}"] = float(
                        np.median(mem.d1) / np.median(to_twin))
                if space != "pixel":
                    continue
                top = mem.most_copied(max(cfg.copy_pairs, 1))
                out[f"most_copied_{set_name}"] = {
                    "sample": int(top[0]), "neighbour": int(mem.nearest[top[0]]),
                    "d1_d2": float(mem.ratio[top[0]]), "d1": float(mem.d1[top[0]])}
                if (copies_path and cfg.copy_pairs and set_name == sets[0][0]
                        and jax.process_index() == 0):
                    pairs = np.concatenate([images[top], set_images[mem.nearest[top]]])
                    images_lib.save_png(images_lib.make_grid(pairs, columns=len(top)),
                                        copies_path)
                    out["copies_png"] = os.path.basename(copies_path)
        if same:
            out.update({k.replace("_train_", "_data_").replace("_train", "_data"): v
                        for k, v in list(out.items()) if "_train" in k})
        return out

    def evaluate_model(self, experiment, params, num: int, key: jax.Array,
                       train: TrainingImages | None = None,
                       copies_path: str | None = None) -> dict:
        """Generate ``num`` images from ``params`` with the experiment's sampler (batches of
        eval.batch_size, progress logged) and evaluate them (``train``, ``copies_path``: see
        ``evaluate``)."""
        batch = self.config.eval.batch_size
        labels = experiment.sample_labels(num)
        out, start = [], time.time()
        last_line = start
        for i, first in enumerate(range(0, num, batch)):
            count = min(batch, num - first)
            batch_labels = None if labels is None else labels[first:first + count]
            if batch_labels is not None:  # full batches only: one compilation
                batch_labels = np.resize(batch_labels, batch)
            images = experiment.generate(params, batch, jax.random.fold_in(key, i),
                                         batch_labels)
            out.append(images[:count])
            done = first + count
            now = time.time()
            if done == num or now - last_line >= self.config.train.progress_every_secs:
                rate = done / (now - start)
                logging.info("Evaluation: generated %d/%d images (%.3g images/s, ETA %s).",
                             done, num, rate, progress_lib.format_duration((num - done) / rate))
                last_line = now
        samples = np.concatenate(out)
        generate_seconds, start = time.time() - start, time.time()
        result = self.evaluate(samples, labels, train, copies_path)
        result.update(generate_seconds=generate_seconds, metrics_seconds=time.time() - start)
        return result


def without_timings(result: dict) -> dict:
    """``result`` without its wall-clock entries (for records that must repeat exactly)."""
    return {k: v for k, v in result.items() if k not in ("generate_seconds", "metrics_seconds")}


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
