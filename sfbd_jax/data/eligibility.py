"""Ambient-Omni batches: draw the diffusion level σ first, then an example eligible at σ.

Example i carries annotations σ_min,i (0 = clean, ∞ = never at high noise), σ_max,i (locality:
also usable below this level; 0 = never) and σ_n,i (known Gaussian noise already in the image;
0 = none). It is *eligible* at σ when

    σ > σ_min,i·√(s_max / (s_max − 1))      (high noise: the corruption no longer shows)
    or σ < σ_max,i                          (low noise: the denoiser only sees small patches)

(METHODS.md §3; s_max = 4 gives a safety factor of 1.155). With σ_n,i > 0 only the first rule
applies, and σ_min,i ≥ σ_n,i, so σ² − σ_n² ≥ σ_n²/(s_max − 1) and the ambient loss weight
σ⁴/(σ² − σ_n²)² stays ≤ s_max².

Each batch element draws σ ~ logN(P_mean, P_std) conditioned on at least one eligible example
(redrawn otherwise), then an example uniformly among those eligible at σ: the loss at every
level is the unbiased average over the data allowed there, and no batch element is wasted.
Everything is a pure function of (seed, step), so resumes and any number of hosts agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sfbd_jax.data import pipeline
from sfbd_jax.data.sources import ImageDataset

_MAX_REDRAWS = 1000


def safety_factor(s_max: float) -> float:
    """√(s_max / (s_max − 1)): how far above σ_min an annotated example starts being used."""
    if not s_max > 1.0:
        raise ValueError(f"config.ambient.s_max must be > 1, got {s_max}")
    return float(np.sqrt(s_max / (s_max - 1.0)))


@dataclasses.dataclass(frozen=True)
class Annotations:
    """Per-example noise-level annotations of a training set (σ on the [-1, 1] scale), each
    (N,) float64: ``sigma_min`` (0 clean, inf never at high noise), ``sigma_max`` (0 = no
    low-noise use) and ``sigma_n`` (0 = no known noise)."""

    sigma_min: np.ndarray
    sigma_max: np.ndarray
    sigma_n: np.ndarray

    @classmethod
    def make(cls, sigma_min, sigma_max=None, sigma_n=None) -> Annotations:
        sigma_min = np.asarray(sigma_min, np.float64)
        zeros = np.zeros_like(sigma_min)
        out = cls(sigma_min, zeros if sigma_max is None else np.asarray(sigma_max, np.float64),
                  zeros if sigma_n is None else np.asarray(sigma_n, np.float64))
        out.validate()
        return out

    def __len__(self) -> int:
        return len(self.sigma_min)

    def validate(self) -> None:
        """Raise ValueError naming the first broken rule."""
        n = len(self.sigma_min)
        for name in ("sigma_min", "sigma_max", "sigma_n"):
            a = getattr(self, name)
            if a.shape != (n,):
                raise ValueError(f"annotation {name} has shape {a.shape}, expected ({n},)")
            if np.isnan(a).any() or (a < 0).any():
                raise ValueError(f"annotation {name} has NaN or negative values")
        if not np.isfinite(self.sigma_n).all() or not np.isfinite(self.sigma_max).all():
            raise ValueError("annotations sigma_n and sigma_max must be finite")
        noisy = self.sigma_n > 0
        if (self.sigma_min[noisy] < self.sigma_n[noisy]).any():
            raise ValueError("an example with known noise sigma_n has sigma_min < sigma_n: it "
                             "would be trained below its own noise level")
        if (self.sigma_max[noisy] > 0).any():
            raise ValueError("examples with known noise sigma_n > 0 cannot have sigma_max > 0 "
                             "(they are never usable below their noise level)")

    @staticmethod
    def concatenate(parts: list[Annotations]) -> Annotations:
        return Annotations.make(*(np.concatenate([getattr(p, f) for p in parts])
                                  for f in ("sigma_min", "sigma_max", "sigma_n")))


class EligibleSampler:
    """Draws (σ, example index) pairs by the rule of the module docstring."""

    def __init__(self, annotations: Annotations, s_max: float, p_mean: float, p_std: float):
        annotations.validate()
        if len(annotations) == 0:
            raise ValueError("cannot draw batches from an empty data set")
        self.annotations = annotations
        self.threshold = annotations.sigma_min * safety_factor(s_max)  # 0·∞ does not occur
        self.p_mean, self.p_std = p_mean, p_std
        self._by_threshold = np.argsort(self.threshold, kind="stable")
        self._thresholds_sorted = self.threshold[self._by_threshold]
        self._by_sigma_max = np.argsort(-annotations.sigma_max, kind="stable")
        self._neg_sigma_max_sorted = -annotations.sigma_max[self._by_sigma_max]
        if not np.isfinite(self._thresholds_sorted[0]) and self._neg_sigma_max_sorted[0] == 0:
            raise ValueError("no example is eligible at any noise level: every sigma_min is "
                             "infinite and no sigma_max is set")

    def high_counts(self, sigma: np.ndarray) -> np.ndarray:
        """Examples with threshold < σ (a prefix of the threshold order)."""
        return np.searchsorted(self._thresholds_sorted, sigma, side="left")

    def low_counts(self, sigma: np.ndarray) -> np.ndarray:
        """Examples with σ_max > σ (a prefix of the descending σ_max order)."""
        return np.searchsorted(self._neg_sigma_max_sorted, -np.asarray(sigma), side="left")

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(σ (n,) float32, indices (n,) int64): σ from the training distribution conditioned
        on a non-empty eligible set, each index uniform over the examples eligible at its σ."""
        sigma = np.exp(self.p_mean + self.p_std * rng.standard_normal(n))
        for _ in range(_MAX_REDRAWS):
            empty = (self.high_counts(sigma) + self.low_counts(sigma)) == 0
            if not empty.any():
                break
            sigma[empty] = np.exp(self.p_mean + self.p_std * rng.standard_normal(empty.sum()))
        else:
            raise ValueError("the annotations leave almost every training noise level without "
                             "an eligible example: lower sigma_min or add clean images")
        index = np.empty(n, np.int64)
        todo = np.arange(n)
        # Uniform over the union of the two prefixes: pick a prefix in proportion to its size,
        # a member uniformly, and accept it with probability 1 / (number of prefixes holding it).
        while todo.size:
            s = sigma[todo]
            a, b = self.high_counts(s), self.low_counts(s)
            from_high = rng.random(todo.size) * (a + b) < a
            u = rng.random(todo.size)
            pick = np.where(from_high,
                            self._by_threshold[np.minimum((u * a).astype(np.int64),
                                                          np.maximum(a - 1, 0))],
                            self._by_sigma_max[np.minimum((u * b).astype(np.int64),
                                                          np.maximum(b - 1, 0))])
            in_both = (self.threshold[pick] < s) & (self.annotations.sigma_max[pick] > s)
            accept = ~in_both | (rng.random(todo.size) < 0.5)
            index[todo[accept]] = pick[accept]
            todo = todo[~accept]
        return sigma.astype(np.float32), index


class AmbientBatches(pipeline.TrainBatches):
    """``TrainBatches`` whose examples and levels come from an ``EligibleSampler``: each
    batch also carries ``sigma`` (B,) and ``sigma_n`` (B,) for the ambient loss."""

    def __init__(self, dataset: ImageDataset, annotations: Annotations, *, s_max: float,
                 p_mean: float, p_std: float, batch_size: int, steps_per_dispatch: int,
                 seed: int, mesh, num_classes: int, random_flip: bool = False,
                 unclipped: bool = False):
        if len(annotations) != len(dataset):
            raise ValueError(f"{len(annotations)} annotations for a data set of "
                             f"{len(dataset)} images")
        super().__init__(dataset, batch_size, steps_per_dispatch, seed, mesh, num_classes,
                         random_flip, unclipped=unclipped)
        self.sampler = EligibleSampler(annotations, s_max, p_mean, p_std)

    def draw(self, step: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rng = np.random.default_rng([self.seed, 0xA3B1E, step])
        sigma, index = self.sampler.draw(rng, self.indexer.batch_size)
        sigma_n = self.sampler.annotations.sigma_n[index].astype(np.float32)
        return index, {"sigma": sigma, "sigma_n": sigma_n}
