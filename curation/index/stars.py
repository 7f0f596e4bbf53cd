"""Connected components by alternating large-star / small-star rounds (Kiveris et al., "Connected Components
in MapReduce and Beyond", SoCC 2014), as per-bucket reducers that never see more than one bucket of edges.

The graph is held as directed rows ``(u, v)``: every undirected edge appears once from each end, and the rows
of node ``u`` (its neighbourhood) all sit in ``u``'s bucket. One round maps the rows of one bucket to new
undirected edges, which the caller writes (both directions) bucketed by node for the next round:

* large-star at ``u``: with ``m = min(N(u) + {u})``, every neighbour ``v > u`` is linked to ``m``;
* small-star at ``u``: with ``S = {v in N(u): v < u}`` non-empty and ``m = min S``, ``u`` and every ``v in S``
  are linked to ``m``.

Alternating them converges in O(log^2 n) rounds to a forest of stars centred on each component's smallest
node. :func:`unstable_nodes` counts the nodes that still violate the star shape (a node with two smaller
neighbours, or with a smaller and a larger one); when a round's input has none, it is the final star forest
and :func:`star_labels` reads every node's component (its smallest member) off it. Labels do not depend on
how the rows were bucketed, so the result is the same on any number of workers.
"""

from __future__ import annotations

import numpy as np

__all__ = ["large_star", "small_star", "star_labels", "unstable_nodes", "undirected_rows"]


def _sorted_unique(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows sorted by (u, v), without self loops, and the start index of every node's segment."""
    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    keep = u != v
    u, v = u[keep], v[keep]
    if not len(u):
        return u, v, np.zeros(0, np.int64)
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    first = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])]
    u, v = u[first], v[first]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    return u, v, starts


def _segment_ids(n_rows: int, starts: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n_rows]))


def large_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges ``(a, b)`` made by large-star from the rows ``(u, v)`` of the bucket's nodes."""
    u, v, starts = _sorted_unique(u, v)
    if not len(u):
        return u, v
    seg = _segment_ids(len(u), starts)
    m = np.minimum(v[starts], u[starts])[seg]  # v sorted inside each segment: the first is the smallest
    up = v > u
    return v[up], m[up]


def small_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Undirected edges ``(a, b)`` made by small-star from the rows ``(u, v)`` of the bucket's nodes."""
    u, v, starts = _sorted_unique(u, v)
    if not len(u):
        return u, v
    seg = _segment_ids(len(u), starts)
    m = v[starts][seg]  # smallest neighbour of the row's node
    down = v < u
    links_v = down & (v != m)
    has_down = np.zeros(len(starts), dtype=bool)
    has_down[seg[down]] = True
    return np.r_[v[links_v], u[starts][has_down]], np.r_[m[links_v], v[starts][has_down]]


def unstable_nodes(u: np.ndarray, v: np.ndarray) -> int:
    """Nodes of the bucket not yet in star shape (see the module docstring); 0 for a finished star forest."""
    u, v, starts = _sorted_unique(u, v)
    if not len(u):
        return 0
    seg = _segment_ids(len(u), starts)
    n_down = np.bincount(seg, weights=v < u, minlength=len(starts))
    n_up = np.bincount(seg, weights=v > u, minlength=len(starts))
    return int(((n_down >= 2) | ((n_down >= 1) & (n_up >= 1))).sum())


def star_labels(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(nodes, component labels)`` of the bucket's nodes in a finished star forest (label = smallest node)."""
    u, v, starts = _sorted_unique(u, v)
    if not len(u):
        return u, v
    return u[starts], np.minimum(u[starts], v[starts])


def undirected_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of every distinct undirected edge ``(a, b)`` (self loops dropped)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    keep = lo != hi
    lo, hi = lo[keep], hi[keep]
    if len(lo):
        pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
        lo, hi = pairs[:, 0], pairs[:, 1]
    return np.r_[lo, hi], np.r_[hi, lo]
