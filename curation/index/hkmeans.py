"""Hierarchical spherical k-means with resampling (Vo et al. 2024, arXiv 2405.15613; written from the paper).

Level 1 clusters the data, level t clusters the centroids of level t-1. After the k-means of a level,
``n_resampling_steps`` times: take the ``sample_size`` points closest to each centroid (among the points
assigned to it) and re-run k-means from a fresh initialisation on that union. k-means centroids follow the
data density roughly as p^(d/(d+2)); the resampled set has the density of the centroids, so every step flattens
the density further and the centroids spread more evenly over the support of the data. When the union holds
fewer points than clusters (empty clusters with ``sample_size=1``), the step runs Lloyd iterations from the
current centroids instead. Finally every item of the level is assigned to its nearest centroid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curation.index.kmeans import INIT_METHODS, assign, lloyd_refine, spherical_kmeans
from curation.index.search import as_unit_float32

__all__ = ["LevelConfig", "Level", "hierarchical_kmeans", "closest_per_cluster"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class LevelConfig:
    """One level of hierarchical k-means."""

    n_clusters: int
    """Number of centroids at this level (must not exceed the number of items of the level)."""
    n_resampling_steps: int = 0
    """Resampling steps after the plain k-means (the paper uses 1-10)."""
    sample_size: int = 1
    """Points closest to each centroid drawn per resampling step (the paper: about half the mean cluster size)."""
    niter: int = 20
    """k-means (and per-resampling-step Lloyd) iterations."""
    max_points_per_centroid: int = 256
    """The plain k-means trains on at most this many points per centroid (faiss subsampling)."""
    init: str = "random"
    """k-means initialisation: "random", "kmeans++" (slow for large k) or "afkmc2"."""
    nredo: int = 1
    """k-means runs per fit (best objective kept)."""

    def __post_init__(self) -> None:
        if self.init not in INIT_METHODS:
            raise ValueError(f"LevelConfig.init must be one of {INIT_METHODS}, got {self.init!r}")
        for name in ("n_clusters", "sample_size", "niter", "max_points_per_centroid", "nredo"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LevelConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.n_resampling_steps, int) or self.n_resampling_steps < 0:
            raise ValueError(f"LevelConfig.n_resampling_steps must be an int >= 0, got {self.n_resampling_steps!r}")


@dataclass
class Level:
    """Result of one level."""

    centroids: np.ndarray
    """float32 (n_clusters, d), L2-normalised."""
    assignment: np.ndarray
    """int64: cluster of every item of the previous level (data points for level 1)."""
    distance: np.ndarray
    """float32: 1 - cosine similarity of every item to its centroid."""


def closest_per_cluster(labels: np.ndarray, dist: np.ndarray, r: int) -> np.ndarray:
    """Indices (sorted) of the ``r`` items closest to their centroid in every cluster (fewer if it is smaller)."""
    order = np.lexsort((np.arange(len(labels)), dist, labels))
    lab = labels[order]
    first = np.ones(len(lab), dtype=bool)
    first[1:] = lab[1:] != lab[:-1]
    start = np.maximum.accumulate(np.where(first, np.arange(len(lab)), 0))
    rank = np.arange(len(lab)) - start
    return np.sort(order[rank < r])


def hierarchical_kmeans(x: np.ndarray, levels: Sequence[LevelConfig], seed: int = 0, *,
                        use_gpu: bool | None = None, threads: int | None = None) -> list[Level]:
    """Hierarchical k-means of L2-normalised ``x`` (n, d) with one :class:`Level` per entry of ``levels``."""
    if not len(levels):
        raise ValueError("levels must hold at least one LevelConfig")
    cur = as_unit_float32(x, "x")
    out: list[Level] = []
    for li, cfg in enumerate(levels):
        if not isinstance(cfg, LevelConfig):
            raise ValueError(f"levels[{li}] must be a LevelConfig, got {type(cfg).__name__}")
        if cfg.n_clusters > len(cur):
            raise ValueError(f"levels[{li}].n_clusters={cfg.n_clusters} exceeds the {len(cur)} items of that level "
                             "(each level clusters the previous level's centroids); lower it")
        kw = dict(niter=cfg.niter, max_points_per_centroid=cfg.max_points_per_centroid, use_gpu=use_gpu,
                  init=cfg.init, nredo=cfg.nredo, threads=threads)
        cent = spherical_kmeans(cur, cfg.n_clusters, seed=seed + 1000 * li, **kw)
        for step in range(cfg.n_resampling_steps):
            labels, dist = assign(cur, cent, threads=threads)
            sample = closest_per_cluster(labels, dist, cfg.sample_size)
            if len(sample) >= cfg.n_clusters:
                cent = spherical_kmeans(cur[sample], cfg.n_clusters, seed=seed + 1000 * li + step + 1, **kw)
            else:
                cent = lloyd_refine(cur[sample], cent, cfg.niter)
        labels, dist = assign(cur, cent, threads=threads)
        out.append(Level(centroids=cent, assignment=labels, distance=dist))
        log.info("level %d: %d items -> %d clusters (%d non-empty), %d resampling steps", li + 1, len(cur),
                 cfg.n_clusters, len(np.unique(labels)), cfg.n_resampling_steps)
        cur = cent
    return out
