"""Nearest-neighbour metrics of generated samples (host-side, float64, chunked).

Every function takes row vectors (N, D) — flattened pixels in [-1, 1] or evaluation features —
and never holds an N×M distance matrix: distances are computed block by block
(``block_elements`` entries at a time, default 2²² = 32 MiB of float64), keeping only per-row
running results. Euclidean distances, ‖a‖² + ‖b‖² − 2aᵀb in float64, clipped at 0.

- ``k_nearest``: the k smallest distances (and indices) of each query among references.
- ``memorisation``: for each sample, its nearest (d₁) and second-nearest (d₂) training image;
  the fraction with d₁/d₂ < 1/3 (memorised: Yoon et al. 2023; Gu et al. 2023) and the median
  d₁ of the samples against the median nearest-training-image distance of real images that
  are *not* in the training set (a ratio ≪ 1 means the samples sit closer to the training
  images than fresh real images do: copying).
- ``manifold_metrics``: improved precision/recall (Kynkäänniemi et al. 2019: k-NN balls,
  membership ``d ≤ r``) and density/coverage (Naeem et al. 2020: ``d < r``, as their code).
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_BLOCK_ELEMENTS = 1 << 22
# Ball membership compares block distances (the float64 expansion, relative round-off far
# below this) with radii recomputed exactly: a distance within this relative margin of a radius
# is a tie at the radius, so membership does not depend on round-off (identical sets score 1).
_RELATIVE_TIE = 1e-9


def _rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    x = x.reshape(len(x), -1).astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        raise FloatingPointError(f"{name} contains NaN/inf")
    return x


def _chunks(n_query: int, n_ref: int, block_elements: int) -> tuple[int, int]:
    """Query and reference chunk sizes whose product is at most ``block_elements``."""
    q = max(1, min(n_query, int(np.sqrt(block_elements))))
    return q, max(1, min(n_ref, block_elements // q))


def _blocks(queries: np.ndarray, refs: np.ndarray, block_elements: int):
    """Yield (q0, r0, distances (q, r) float64) over all blocks of the distance matrix."""
    qc, rc = _chunks(len(queries), len(refs), block_elements)
    ref_sq = np.einsum("ij,ij->i", refs, refs)
    for q0 in range(0, len(queries), qc):
        q = queries[q0:q0 + qc]
        q_sq = np.einsum("ij,ij->i", q, q)
        for r0 in range(0, len(refs), rc):
            r = refs[r0:r0 + rc]
            d = q @ r.T  # in place from here on: one block of memory
            d *= -2.0
            d += q_sq[:, None]
            d += ref_sq[None, r0:r0 + rc]
            np.maximum(d, 0.0, out=d)
            yield q0, r0, np.sqrt(d, out=d)


def k_nearest(queries: np.ndarray, refs: np.ndarray, k: int, *, exclude_self: bool = False,
              block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """(distances (N, k) ascending, indices (N, k)) of the k nearest ``refs`` of each query.

    ``exclude_self``: queries and refs are the same set; row i never matches itself (the
    leave-one-out neighbours). Among exactly equal distances any index may be returned.
    """
    queries, refs = _rows(queries, "queries"), _rows(refs, "references")
    if queries.shape[1] != refs.shape[1]:
        raise ValueError(f"dimensions differ: queries {queries.shape[1]}, refs {refs.shape[1]}")
    if exclude_self and len(queries) != len(refs):
        raise ValueError("exclude_self needs queries and refs to be the same set")
    available = len(refs) - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} nearest neighbours need at least {k} reference rows "
                         f"(have {available})")
    best_d = np.full((len(queries), k), np.inf)
    best_i = np.full((len(queries), k), -1, np.int64)
    for q0, r0, d in _blocks(queries, refs, block_elements):
        n_q, n_r = d.shape
        if exclude_self:
            rows = np.arange(q0, q0 + n_q)
            hit = (rows >= r0) & (rows < r0 + n_r)
            d[np.nonzero(hit)[0], rows[hit] - r0] = np.inf
        cols = np.broadcast_to(np.arange(r0, r0 + n_r), (n_q, n_r))
        if n_r > k:  # the block's k smallest, then merge with the running k
            part = np.argpartition(d, k - 1, axis=1)[:, :k]
            d, cols = np.take_along_axis(d, part, axis=1), np.take_along_axis(cols, part, axis=1)
        cand_d = np.concatenate([best_d[q0:q0 + n_q], d], axis=1)
        cand_i = np.concatenate([best_i[q0:q0 + n_q], cols], axis=1)
        order = np.argsort(cand_d, axis=1, kind="stable")[:, :k]
        best_d[q0:q0 + n_q] = np.take_along_axis(cand_d, order, axis=1)
        best_i[q0:q0 + n_q] = np.take_along_axis(cand_i, order, axis=1)
    # The expansion ‖a‖² + ‖b‖² − 2aᵀb loses small distances to round-off (an exact copy
    # comes out ~1e-8, not 0): recompute the k found directly as ‖a − b‖ and re-sort.
    rows = max(1, block_elements // max(1, k * queries.shape[1]))
    for q0 in range(0, len(queries), rows):
        diff = queries[q0:q0 + rows, None, :] - refs[best_i[q0:q0 + rows]]
        best_d[q0:q0 + rows] = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff))
    order = np.argsort(best_d, axis=1, kind="stable")
    return np.take_along_axis(best_d, order, axis=1), np.take_along_axis(best_i, order, axis=1)


@dataclasses.dataclass(frozen=True)
class Memorisation:
    """Per-sample nearest-neighbour facts and their summary.

    d1, d2: (N,) distances to the nearest and second-nearest training image; nearest: (N,)
    index of the nearest; ratio: d1/d2 (0 when d1 = 0); heldout_d1: nearest-training-image
    distance of each held-out real image; heldout: 'outside' (real images not in the training
    set) or 'leave_one_out' (each training image against the others).
    """

    d1: np.ndarray
    d2: np.ndarray
    nearest: np.ndarray
    ratio: np.ndarray
    heldout_d1: np.ndarray
    heldout: str
    threshold: float

    def summary(self) -> dict:
        median_d1 = float(np.median(self.d1))
        median_heldout = float(np.median(self.heldout_d1))
        return {"memorised_fraction": float(np.mean(self.ratio < self.threshold)),
                "median_d1": median_d1, "median_d1_heldout": median_heldout,
                "d1_ratio": median_d1 / median_heldout if median_heldout > 0 else float("nan"),
                "heldout": self.heldout, "heldout_count": int(len(self.heldout_d1))}

    def most_copied(self, count: int) -> np.ndarray:
        """Indices of the ``count`` samples with the smallest d1/d2 (the most copied first)."""
        return np.argsort(self.ratio, kind="stable")[:count]


def memorisation(samples: np.ndarray, train: np.ndarray, heldout: np.ndarray | None = None,
                 *, threshold: float = 1.0 / 3.0,
                 block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> Memorisation:
    """Nearest-neighbour memorisation of ``samples`` (N, …) against ``train`` (M ≥ 2, …).

    ``heldout``: real images of the same distribution that are not in ``train``; None →
    leave-one-out (each training image's nearest *other* training image), whose distance is
    distributed as that of a fresh image to M − 1 training images.
    """
    if len(train) < 2:
        raise ValueError(f"memorisation needs at least 2 training images (d₂), got {len(train)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the memorisation threshold on d1/d2 must lie in (0, 1], got "
                         f"{threshold}")
    dist, index = k_nearest(samples, train, 2, block_elements=block_elements)
    d1, d2 = dist[:, 0], dist[:, 1]
    ratio = np.where(d1 == 0.0, 0.0, d1 / np.where(d2 == 0.0, 1.0, d2))
    if heldout is None or len(heldout) == 0:
        base, kind = k_nearest(train, train, 1, exclude_self=True,
                               block_elements=block_elements)[0][:, 0], "leave_one_out"
    else:
        base, kind = k_nearest(heldout, train, 1, block_elements=block_elements)[0][:, 0], \
            "outside"
    return Memorisation(d1, d2, index[:, 0], ratio, base, kind, threshold)


def kth_neighbour_radius(points: np.ndarray, k: int, *,
                         block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> np.ndarray:
    """(N,) distance of each point to its k-th nearest *other* point of the same set."""
    return k_nearest(points, points, k, exclude_self=True, block_elements=block_elements)[0][
        :, k - 1]


def manifold_metrics(real: np.ndarray, fake: np.ndarray, *, pr_k: int = 3, dc_k: int = 5,
                     block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> dict:
    """Precision, recall (k = ``pr_k``), density and coverage (k = ``dc_k``) of ``fake`` (N, D)
    against ``real`` (M, D).

    precision = share of fake samples within the k-NN ball of some real sample (d ≤ r);
    recall = share of real samples within the k-NN ball of some fake sample (d ≤ r);
    density = (1/(k·N)) Σ_fake #{real balls (k = dc_k) holding it (d < r)};
    coverage = share of real samples whose ball (k = dc_k) holds a fake sample (d < r).
    """
    real, fake = _rows(real, "real features"), _rows(fake, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
    k_max = max(pr_k, dc_k)
    if len(real) <= k_max or len(fake) <= pr_k:
        raise ValueError(f"precision/recall (k={pr_k}) and density/coverage (k={dc_k}) need more "
                         f"than {k_max} real and {pr_k} generated samples, got {len(real)} and "
                         f"{len(fake)}")
    real_knn = k_nearest(real, real, k_max, exclude_self=True, block_elements=block_elements)[0]
    r_pr, r_dc = real_knn[:, pr_k - 1], real_knn[:, dc_k - 1]
    r_fake = kth_neighbour_radius(fake, pr_k, block_elements=block_elements)
    # d ≤ r and d < r, with ties at the radius decided by definition, not by round-off.
    r_pr, r_fake = r_pr * (1 + _RELATIVE_TIE), r_fake * (1 + _RELATIVE_TIE)
    r_dc_open = r_dc * (1 - _RELATIVE_TIE)
    fake_in_real = np.zeros(len(fake), bool)
    density_count = np.zeros(len(fake), np.int64)
    real_in_fake = np.zeros(len(real), bool)
    nearest_fake = np.full(len(real), np.inf)
    # Blocks of fake (rows) × real (columns).
    for f0, r0, d in _blocks(fake, real, block_elements):
        n_f, n_r = d.shape
        fake_in_real[f0:f0 + n_f] |= np.any(d <= r_pr[None, r0:r0 + n_r], axis=1)
        density_count[f0:f0 + n_f] += np.sum(d < r_dc_open[None, r0:r0 + n_r], axis=1)
        real_in_fake[r0:r0 + n_r] |= np.any(d <= r_fake[f0:f0 + n_f, None], axis=0)
        np.minimum(nearest_fake[r0:r0 + n_r], d.min(axis=0), out=nearest_fake[r0:r0 + n_r])
    return {"precision": float(np.mean(fake_in_real)), "recall": float(np.mean(real_in_fake)),
            "density": float(np.sum(density_count) / (dc_k * len(fake))),
            "coverage": float(np.mean(nearest_fake < r_dc_open))}
