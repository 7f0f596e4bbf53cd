"""Seed-based retrieval from an uncurated pool (DINOv2 appendix A.4) and collision statistics.

* ``retrieve_knn``: the ``n_per_seed`` nearest pool images of every seed image (cosine; DINOv2 used N=4).
* ``retrieve_by_cluster``: for small seed sets, every pool cluster holding *more than*
  ``min_seeds_per_cluster`` seed images contributes ``m_per_cluster`` pool images (all of them when smaller),
  chosen at random under ``seed`` (or closest to the centroid when ``pool_dist`` is given). If the union exceeds
  the per-dataset ``cap``, the cap is split over the retrieved clusters by water-filling (small clusters keep
  all their picks, large ones are trimmed evenly) so the capped set stays as diverse as possible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.index.balanced import waterfill
from curation.index.config import IndexConfig
from curation.index.search import knn_search

__all__ = [
    "CollisionStats",
    "cluster_take",
    "collision_counts",
    "collision_stats",
    "retrieve_by_cluster",
    "retrieve_knn",
]


def retrieve_knn(pool: np.ndarray, seeds: np.ndarray, n_per_seed: int = 4, index: IndexConfig | None = None, *,
                 min_score: float | None = None, progress: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seed_idx, pool_idx, score) of the ``n_per_seed`` nearest pool images of every seed, seed-major order.

    Pairs scoring ``<= min_score`` are dropped when ``min_score`` is set; a pool image may be retrieved by
    several seeds (see :func:`collision_stats`).
    """
    if not isinstance(n_per_seed, (int, np.integer)) or isinstance(n_per_seed, bool) or n_per_seed < 1:
        raise ValueError(f"n_per_seed must be a positive int, got {n_per_seed!r}")
    sims, ids = knn_search(pool, seeds, int(n_per_seed), index, progress=progress)
    mask = ids >= 0
    if min_score is not None:
        mask &= sims > float(min_score)
    rows, cols = np.nonzero(mask)
    return rows.astype(np.int64), ids[rows, cols], sims[rows, cols].astype(np.float32)


def _labels(name: str, labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-d integer array of cluster ids, got {arr.dtype} {arr.shape}")
    if len(arr) and arr.min() < 0:
        raise ValueError(f"{name} holds negative cluster ids")
    return arr.astype(np.int64)


def retrieve_by_cluster(pool_labels: np.ndarray, seed_labels: np.ndarray, m_per_cluster: int = 10_000,
                        min_seeds_per_cluster: int = 3, cap: int | None = 1_000_000, seed: int = 0, *,
                        pool_dist: np.ndarray | None = None) -> np.ndarray:
    """Sorted pool indices retrieved from clusters holding more than ``min_seeds_per_cluster`` seeds."""
    pl = _labels("pool_labels", pool_labels)
    sl = _labels("seed_labels", seed_labels)
    for name, value in (("m_per_cluster", m_per_cluster), ("min_seeds_per_cluster", min_seeds_per_cluster)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if cap is not None and (not isinstance(cap, (int, np.integer)) or cap < 0):
        raise ValueError(f"cap must be None or a non-negative int, got {cap!r}")
    if len(pl) == 0 or len(sl) == 0:
        return np.zeros(0, dtype=np.int64)
    n_clusters = int(max(pl.max(), sl.max())) + 1
    rng = np.random.default_rng(seed)
    take, _ = cluster_take(np.bincount(pl, minlength=n_clusters), np.bincount(sl, minlength=n_clusters),
                           m_per_cluster, min_seeds_per_cluster, cap, rng)
    if pool_dist is not None:
        tie = np.asarray(pool_dist, dtype=np.float64).ravel()
        if tie.shape != pl.shape:
            raise ValueError(f"pool_dist must have one value per pool image ({len(pl)}), got {tie.shape}")
    else:
        tie = rng.random(len(pl))
    alloc = waterfill(pl, np.ones(len(pl), dtype=np.int64), take, tie)
    return np.flatnonzero(alloc).astype(np.int64)


def cluster_take(pool_counts: np.ndarray, seed_counts: np.ndarray, m_per_cluster: int, min_seeds_per_cluster: int,
                 cap: int | None, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Pool images each cluster gives (:func:`retrieve_by_cluster` before the leaf picks), from counts alone.

    ``pool_counts``/``seed_counts`` have one entry per cluster id up to the largest used one. Returns the take
    per cluster and the number of ``rng.random`` values drawn (the cap's water-filling ties; the leaf tie keys
    come next).
    """
    n_clusters = len(pool_counts)
    take = np.where(np.asarray(seed_counts) > min_seeds_per_cluster,
                    np.minimum(np.asarray(pool_counts, dtype=np.int64), m_per_cluster), 0).astype(np.int64)
    if cap is not None and take.sum() > cap:
        tie = rng.random(n_clusters)
        return waterfill(np.zeros(n_clusters, dtype=np.int64), take, np.array([cap]), tie), n_clusters
    return take, 0


def collision_counts(pool_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique pool indices, number of times each was retrieved)."""
    uniq, counts = np.unique(np.asarray(pool_idx, dtype=np.int64), return_counts=True)
    return uniq, counts


@dataclass
class CollisionStats:
    """How often retrieval picked the same pool image for several seeds."""

    n_pairs: int
    """Retrieved (seed, pool) pairs."""
    n_unique: int
    """Distinct pool images retrieved."""
    n_collided: int
    """Pool images retrieved by more than one seed."""
    max_count: int
    """Largest number of seeds retrieving the same pool image."""

    @property
    def collision_rate(self) -> float:
        """Fraction of retrieved pairs that repeat an already retrieved pool image."""
        return 0.0 if self.n_pairs == 0 else 1.0 - self.n_unique / self.n_pairs


def collision_stats(pool_idx: np.ndarray) -> CollisionStats:
    """Summary of :func:`collision_counts` for a retrieval result."""
    _, counts = collision_counts(pool_idx)
    return CollisionStats(n_pairs=int(counts.sum()), n_unique=len(counts), n_collided=int((counts > 1).sum()),
                          max_count=int(counts.max()) if len(counts) else 0)
