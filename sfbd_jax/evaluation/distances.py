"""Distances between two sets of samples or their feature statistics (host-side, float64).

- ``FeatureStats``: streaming mean and covariance of (N, D) features, accumulated in float64.
- ``frechet_distance``: ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), the FID formula.
- ``kernel_inception_distance``: the unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (xᵀy / D + 1)³, averaged over random subsets (KID, Bińkowski et al. 2018).
- ``sliced_wasserstein``: the mean over random unit directions θ of W₁ between the 1-D
  projections θᵀx and θᵀy (pixel space for MNIST-sized data).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FeatureStats:
    """Running sums for the mean and covariance of D-dimensional features."""

    dim: int
    count: int = 0
    total: np.ndarray | None = None
    outer: np.ndarray | None = None

    def __post_init__(self):
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        """Add a batch of features of shape (B, D)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}), got {f.shape}")
        if not np.all(np.isfinite(f)):
            raise FloatingPointError("non-finite features: the samples contain NaN/inf")
        self.count += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(μ (D,), Σ (D, D)) with the unbiased (N − 1) covariance normalisation."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors, have {self.count}")
        mu = self.total / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, cov


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), in float64.

    tr((Σ₁Σ₂)^½) is computed as Σᵢ √λᵢ with λ the eigenvalues of the symmetric PSD matrix
    Σ₁^½ Σ₂ Σ₁^½ (same spectrum as Σ₁Σ₂), which avoids the complex round-off of a general
    matrix square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: μ {mu1.shape} vs {mu2.shape}, "
                         f"Σ {cov1.shape} vs {cov2.shape}")
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD² of (m, D) and (n, D) feature sets (m, n ≥ 2) under KID's kernel
    k(a, b) = (a·b/D + 1)³; can be slightly negative when the sets match."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean())


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, *,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: (mean, std) over ``num_subsets`` subsets of the unbiased MMD² (float64).

    Each subset draws ``min(subset_size, N₁, N₂)`` rows of each set without replacement.
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {f1.shape} and {f2.shape}")
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(len(f1), size, replace=False)],
                             f2[rng.choice(len(f2), size, replace=False)])
              for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))


def _quantiles(values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Empirical quantile function of each column of ``values`` (N, P) at ``levels`` (Q,)."""
    ordered = np.sort(values, axis=0)
    n = ordered.shape[0]
    # The empirical CDF steps at i/n; its quantile at level u is the ⌈u·n⌉-th order statistic.
    index = np.clip(np.ceil(levels * n).astype(np.int64) - 1, 0, n - 1)
    return ordered[index]


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, *, num_projections: int = 512,
                       seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between sample sets x (N, …) and y (M, …).

    Both are flattened to vectors; θ is drawn uniformly on the unit sphere. W₁ of two 1-D
    empirical measures is ∫|F⁻¹(u) − G⁻¹(u)|du, evaluated exactly on the merged grid of
    both sets' CDF steps, so unequal N and M are handled without resampling.
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sample dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((x.shape[1], num_projections))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    px, py = x @ theta, y @ theta
    steps = np.unique(np.concatenate([np.arange(1, len(x) + 1) / len(x),
                                      np.arange(1, len(y) + 1) / len(y), [0.0]]))
    widths = np.diff(steps)
    mids = (steps[:-1] + steps[1:]) / 2
    gap = np.abs(_quantiles(px, mids) - _quantiles(py, mids))
    return float(np.mean(widths @ gap))
