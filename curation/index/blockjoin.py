"""Thresholded similarity join of one block (or one pair of blocks) of vectors: the unit of work of the
distributed copy-detection graph.

The vectors of a block carry global ids. :func:`join_blocks` scores every pair between (or inside) the blocks
once with BLAS and returns, for every vector of the task,

* its ``k`` best edges with (normalised) score strictly above ``threshold`` (ties: smaller neighbour id),
* its best score and partner among every vector the task visited, whatever the threshold.

The same pair visited by several tasks gives the same numbers, so per-vector results of all tasks merge by
"highest score, then smallest id" (:func:`merge_best`, :func:`top_k_edges`) into exactly the result one
process would get by visiting the union of the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.index.join import _Collector

__all__ = ["BlockJoin", "join_blocks", "merge_best", "top_k_edges"]

#: Rows of one matrix product (bounds the score matrix of a task at ``CHUNK x CHUNK`` floats).
CHUNK = 4096
#: Sub-block side inside one block: only the upper triangle of sub-block products is computed.
TRI_CHUNK = 512


@dataclass
class BlockJoin:
    """Edges (``src`` -> ``dst`` global ids, ``score``) and per-vector ``best``/``partner`` of one task."""

    src: np.ndarray
    dst: np.ndarray
    score: np.ndarray
    ids: np.ndarray
    """int64 global id of every vector of the task."""
    best: np.ndarray
    """float32 best score of each vector of ``ids`` (-inf when it saw no other vector)."""
    partner: np.ndarray
    """int64 global id achieving ``best`` (-1 when none)."""


def join_blocks(xa: np.ndarray, ida: np.ndarray, xb: np.ndarray | None = None, idb: np.ndarray | None = None, *,
                k: int, threshold: float, bias_a: np.ndarray | None = None, bias_b: np.ndarray | None = None,
                beta: float = 1.0) -> BlockJoin:  # fmt: skip
    """Join block ``a`` with itself (``xb`` None) or with block ``b`` (disjoint ids); see the module docstring.

    ``xa``/``xb`` are L2-normalised float32 rows with global ids ``ida``/``idb`` (each ascending); ``bias_*``
    are SSCD background biases (score ``cos - beta * (bias_i + bias_j) / 2``).
    """
    ida = np.asarray(ida, dtype=np.int64)
    na = len(ida)
    if xb is None:
        x, ids, nb = xa, ida, 0
        bias = bias_a
    else:
        idb = np.asarray(idb, dtype=np.int64)
        nb = len(idb)
        x = np.concatenate([xa, xb])
        ids = np.concatenate([ida, idb])
        bias = None if bias_a is None else np.concatenate([bias_a, bias_b])
    col = _Collector(len(ids), float(threshold), None if bias is None else np.asarray(bias, np.float32), beta)
    col.k = int(k)
    if xb is None:  # upper triangle of sub-blocks, each product used for both directions
        for qs in range(0, na, TRI_CHUNK):
            q = np.arange(qs, min(na, qs + TRI_CHUNK), dtype=np.int64)
            for ms in range(qs, na, TRI_CHUNK):
                m = np.arange(ms, min(na, ms + TRI_CHUNK), dtype=np.int64)
                sims = x[q] @ x[m].T
                if ms == qs:  # no self pairs
                    sims[np.arange(len(q)), np.arange(len(q))] = -np.inf
                    col.add(q, m, sims)
                else:
                    back = np.ascontiguousarray(sims.T)
                    col.add(q, m, sims)
                    col.add(m, q, back)
    else:
        for qs in range(0, na, CHUNK):
            q = np.arange(qs, min(na, qs + CHUNK), dtype=np.int64)
            for ms in range(0, nb, CHUNK):
                m = np.arange(na + ms, na + min(nb, ms + CHUNK), dtype=np.int64)
                sims = x[q] @ x[m].T
                back = np.ascontiguousarray(sims.T)  # the same products for the other direction
                col.add(q, m, sims)
                col.add(m, q, back)
    src, dst, score = col.finish(int(k))
    partner = np.where(col.partner >= 0, ids[np.maximum(col.partner, 0)], -1)
    return BlockJoin(src=ids[src], dst=ids[dst], score=score, ids=ids, best=col.best, partner=partner)


def merge_best(ids: np.ndarray, best: np.ndarray, partner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct id: highest ``best``, ties to the smallest ``partner`` (ids without a partner lose).

    Returns ``(unique ids ascending, best, partner)``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return ids, np.zeros(0, np.float32), np.zeros(0, np.int64)
    big = np.iinfo(np.int64).max
    order = np.lexsort((np.where(partner >= 0, partner, big), -best.astype(np.float64), ids))
    first = np.r_[True, ids[order][1:] != ids[order][:-1]]
    top = order[first]
    return ids[top], best[top].astype(np.float32), partner[top].astype(np.int64)


def top_k_edges(src: np.ndarray, dst: np.ndarray, score: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Distinct edges (highest score of repeats), at most ``k`` per source: best score first, ties to smaller
    ``dst``; sorted by source."""
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    score = np.asarray(score, dtype=np.float32)
    if not len(src):
        return src, dst, score
    order = np.lexsort((-score.astype(np.float64), dst, src))  # repeats of a pair adjacent, best first
    src, dst, score = src[order], dst[order], score[order]
    pair_first = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])]
    src, dst, score = src[pair_first], dst[pair_first], score[pair_first]
    order = np.lexsort((dst, -score.astype(np.float64), src))  # per source: best score first, ties to smaller dst
    src, dst, score = src[order], dst[order], score[order]
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    rank = np.arange(len(src)) - np.repeat(starts, np.diff(np.r_[starts, len(src)]))
    keep = rank < k
    return src[keep], dst[keep], score[keep]
