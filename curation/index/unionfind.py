"""Vectorised disjoint-set (union-find) over an edge list: connected components with numpy only.

Algorithm (a min-label variant of Shiloach-Vishkin): keep a parent array with ``parent[i] <= i``. Each round
(1) looks up the roots of both ends of every remaining edge, drops edges whose ends already share a root,
(2) hooks every larger root onto the smallest root it touches (``np.minimum.at``), and (3) compresses all
paths by pointer jumping (``parent = parent[parent]``) until every node points at its root. Labels only
decrease, so there are no cycles, and the final root of a component is its smallest member index, which makes
component ids deterministic. Each round is O(E + n) vectorised work and the edge list shrinks every round.
"""

from __future__ import annotations

import numpy as np

__all__ = ["connected_components", "component_sizes"]


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until ``parent[parent] == parent`` (every node points at its root)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes for undirected edges ``(src[i], dst[i])``.

    The label is the smallest node index in the component (int64, shape (n,)); isolated nodes label themselves.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    n = int(n)
    u = np.asarray(src, dtype=np.int64).ravel()
    v = np.asarray(dst, dtype=np.int64).ravel()
    if u.shape != v.shape:
        raise ValueError(f"src and dst must have the same length, got {u.shape} and {v.shape}")
    if len(u) and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n}), got [{min(u.min(), v.min())}, "
                         f"{max(u.max(), v.max())}]")
    parent = np.arange(n, dtype=np.int64)
    # Terminates: every round hooks at least one root per component that still has a live edge.
    while len(u):
        ru = parent[u]
        rv = parent[v]
        live = ru != rv
        if not live.all():
            u, v, ru, rv = u[live], v[live], ru[live], rv[live]
            if not len(u):
                break
        lo = np.minimum(ru, rv)
        hi = np.maximum(ru, rv)
        np.minimum.at(parent, hi, lo)
        parent = _compress(parent)
    return parent


def component_sizes(component: np.ndarray) -> np.ndarray:
    """Size of the component of every node (same shape as ``component``)."""
    component = np.asarray(component, dtype=np.int64)
    return np.bincount(component, minlength=len(component))[component]
