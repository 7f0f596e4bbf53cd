"""Balanced hierarchical sampling (Vo et al. 2024, arXiv 2405.15613): top-down water-filling to an exact size.

A target budget is split over the top-level clusters by water-filling: find the largest integer cap ``x`` with
``sum_i min(x, size_i) <= budget``, give every cluster ``min(x, size_i)``, and hand the remainder out one item
each to clusters larger than ``x`` (chosen at random under the seed). Every cluster's allocation is then split
over its children at the next level down the same way, until the leaves (the data points) get 0 or 1. Leaf
picks are random or, with ``strategy="closest"``, the points closest to their level-1 centroid. The result has
exactly ``target_size`` items whenever the pool has at least that many.

:func:`level1_allocation` is the part above the leaves: it needs the level-1 cluster sizes only, so a
distributed caller (the cluster stage) runs it on summed counts and picks the leaves per part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["waterfill", "balanced_sample", "cluster_sizes", "level1_allocation"]

log = logging.getLogger(__name__)


def _group_starts(counts: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return starts


def waterfill(group: np.ndarray, sizes: np.ndarray, budget: np.ndarray, tie_key: np.ndarray) -> np.ndarray:
    """Split ``budget[g]`` over the items of each group ``g`` (items with ``group == g``) by water-filling.

    ``sizes`` caps each item's share; the remainder after the cap goes to the items larger than the cap with
    the smallest ``tie_key`` (one each). Returns the int64 allocation per item; it sums to ``budget[g]`` in
    every group. Requires ``budget[g] <= sum(sizes[group == g])``.
    """
    group = np.asarray(group, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    budget = np.asarray(budget, dtype=np.int64)
    m = len(group)
    n_groups = len(budget)
    alloc = np.zeros(m, dtype=np.int64)
    if m == 0:
        if budget.sum() > 0:
            raise ValueError("waterfill: positive budget for groups without items")
        return alloc
    totals = np.bincount(group, weights=sizes, minlength=n_groups).astype(np.int64)
    if np.any(budget > totals) or np.any(budget < 0) or np.any(sizes < 0):
        raise ValueError("waterfill: every budget must lie in [0, total size of its group]")
    counts = np.bincount(group, minlength=n_groups)
    starts = _group_starts(counts)
    order = np.lexsort((sizes, group))
    g_s, s_s = group[order], sizes[order]
    rank = np.arange(m, dtype=np.int64) - starts[g_s]
    cs = np.cumsum(s_s)
    cs_within = cs - (cs[starts[g_s]] - s_s[starts[g_s]])
    filled = cs_within + s_s * (counts[g_s] - rank - 1)  # sum_j min(s_(r), s_j): nondecreasing in r
    n_ok = np.bincount(g_s, weights=filled <= budget[g_s], minlength=n_groups).astype(np.int64)
    cap = np.zeros(n_groups, dtype=np.int64)
    none = (n_ok == 0) & (counts > 0)
    cap[none] = budget[none] // counts[none]
    full = (n_ok == counts) & (counts > 0)
    cap[full] = np.iinfo(np.int64).max
    mid = (n_ok > 0) & (n_ok < counts)
    last = starts[mid] + n_ok[mid] - 1  # position (sorted) of the largest fully served item
    cap[mid] = (budget[mid] - cs_within[last]) // (counts[mid] - n_ok[mid])
    alloc = np.minimum(sizes, cap[group])
    remainder = budget - np.bincount(group, weights=alloc, minlength=n_groups).astype(np.int64)
    eligible = sizes > cap[group]
    order2 = np.lexsort((tie_key, ~eligible, group))
    rank2 = np.arange(m, dtype=np.int64) - starts[group[order2]]
    bonus = eligible[order2] & (rank2 < remainder[group[order2]])
    alloc[order2[bonus]] += 1
    return alloc


def cluster_sizes(assignments: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Number of leaf items under every cluster at every level (index 0 = leaves, all ones)."""
    sizes = [np.ones(len(assignments[0]), dtype=np.int64)]
    for lvl, a in enumerate(assignments):
        n_clusters = len(assignments[lvl + 1]) if lvl + 1 < len(assignments) else int(a.max()) + 1 if len(a) else 0
        sizes.append(np.bincount(a, weights=sizes[-1], minlength=n_clusters).astype(np.int64))
    return sizes


def level1_allocation(level1_sizes: np.ndarray, parents: Sequence[np.ndarray], target_size: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Water-fill ``target_size`` from the top level down to the level-1 clusters, from their sizes alone.

    ``level1_sizes[c]`` is the number of leaves of level-1 cluster ``c`` (its length: the level-1 cluster count
    with parents, else the largest used id + 1, as :func:`cluster_sizes` counts); ``parents[k]`` maps the
    level-(k+1) clusters to level k+2. Draws the tie keys of every level from ``rng`` exactly as
    :func:`balanced_sample` does; returns the allocation per level-1 cluster and the number of ``rng.random``
    values drawn (the leaf tie keys come next). Requires ``target_size <= level1_sizes.sum()``.
    """
    sizes = [np.asarray(level1_sizes, dtype=np.int64)]
    for lvl, p in enumerate(parents):
        n_clusters = len(parents[lvl + 1]) if lvl + 1 < len(parents) else int(p.max()) + 1 if len(p) else 0
        sizes.append(np.bincount(p, weights=sizes[-1], minlength=n_clusters).astype(np.int64))
    top = sizes[-1]
    drawn = len(top)
    alloc = waterfill(np.zeros(len(top), dtype=np.int64), top, np.array([target_size]), rng.random(len(top)))
    for lvl in range(len(parents) - 1, -1, -1):
        drawn += len(parents[lvl])
        alloc = waterfill(parents[lvl], sizes[lvl], alloc, rng.random(len(parents[lvl])))
    return alloc, drawn


def _check_assignments(assignments_per_level: Sequence[np.ndarray]) -> list[np.ndarray]:
    if not len(assignments_per_level):
        raise ValueError("assignments_per_level must hold at least one level")
    out = [np.asarray(a, dtype=np.int64).ravel() for a in assignments_per_level]
    for lvl, a in enumerate(out):
        if len(a) and a.min() < 0:
            raise ValueError(f"assignments_per_level[{lvl}] has negative cluster ids")
        if lvl + 1 < len(out) and len(a) and a.max() >= len(out[lvl + 1]):
            raise ValueError(f"assignments_per_level[{lvl}] refers to cluster {a.max()} but level {lvl + 1} "
                             f"assigns only {len(out[lvl + 1])} clusters")
    return out


def balanced_sample(assignments_per_level: Sequence[np.ndarray], target_size: int, *, strategy: str = "random",
                    seed: int = 0, distances: np.ndarray | None = None) -> np.ndarray:
    """Indices (sorted int64) of ``target_size`` leaf items chosen by top-down water-filling.

    ``assignments_per_level[0]`` maps every leaf item to its level-1 cluster, ``[1]`` every level-1 cluster to
    its level-2 cluster, and so on (``Level.assignment`` of :func:`hierarchical_kmeans`). ``strategy`` "random"
    picks leaves at random; "closest" picks those with the smallest ``distances`` (to their level-1 centroid).
    When the pool holds fewer than ``target_size`` items, all of them are returned (and a warning logged).
    """
    a = _check_assignments(assignments_per_level)
    if not isinstance(target_size, (int, np.integer)) or isinstance(target_size, bool) or target_size < 0:
        raise ValueError(f"target_size must be a non-negative int, got {target_size!r}")
    if strategy not in ("random", "closest"):
        raise ValueError(f"strategy must be 'random' or 'closest', got {strategy!r}")
    n = len(a[0])
    if strategy == "closest":
        if distances is None:
            raise ValueError("strategy='closest' needs distances (leaf distance to its level-1 centroid)")
        distances = np.asarray(distances, dtype=np.float64).ravel()
        if distances.shape != (n,):
            raise ValueError(f"distances must have one value per leaf ({n}), got shape {distances.shape}")
    if target_size >= n:
        if target_size > n:
            log.warning("balanced_sample: target %d exceeds the pool (%d items); returning all", target_size, n)
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    sizes = cluster_sizes(a)
    alloc, _ = level1_allocation(sizes[1], a[1:], target_size, rng)
    tie = distances if strategy == "closest" else rng.random(n)
    alloc = waterfill(a[0], sizes[0], alloc, tie)
    picked = np.flatnonzero(alloc)
    assert len(picked) == target_size, "water-filling lost items"  # internal invariant
    return picked.astype(np.int64)
