"""Copy-detection dedup and decontamination as DINOv2 did them (arXiv 2304.07193, appendix A.3).

``copy_detect``: k-NN graph of the embeddings over themselves (self excluded), keep edges whose cosine score
is strictly greater than ``threshold``, take connected components (vectorised union-find), keep one image per
component.

Keep policy: inside each component the image with the highest ``priority`` is kept (e.g. pixel count or a
quality score); ties, and every component when ``priority`` is None, go to the lowest index. Component ids are
the smallest member index, so the output is deterministic for a given kNN graph.

Per image, ``score`` is the best (possibly normalised) similarity to any other image seen in the kNN graph in
either direction, and ``nearest`` is that image when ``score > threshold`` (it then shares the component),
else -1: an image is alone in its component exactly when ``nearest == -1``.

The graph: :func:`curation.index.join.similarity_join` on CPU (BLAS blocks over IVF lists, exact below
``IndexConfig.exact_max``), faiss k-NN search when faiss runs on a GPU (``IndexConfig.self_join``).

SSCD score normalisation (optional ``background``): every image gets a bias ``b_i`` = mean cosine similarity
to its ``background_k`` nearest neighbours in the background set, and an edge (i, j) is scored
``s_ij - beta * (b_i + b_j) / 2`` (the query-side correction of SSCD, symmetrised so the graph stays
undirected). ``threshold`` then applies to the normalised score.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from curation.index.config import IndexConfig
from curation.index.join import similarity_join
from curation.index.search import _want_gpu, as_unit_float32, knn_search, self_knn
from curation.index.unionfind import connected_components

__all__ = ["DedupResult", "DecontamResult", "copy_detect", "components_from_knn", "decontaminate", "background_bias"]

log = logging.getLogger(__name__)


@dataclass
class DedupResult:
    """Per-image copy-detection result (all arrays have length n)."""

    component: np.ndarray
    """int64 component id = smallest member index."""
    keep: np.ndarray
    """bool, exactly one True per component."""
    nearest: np.ndarray
    """int64 best-scoring other member of the component, -1 if the image is alone."""
    score: np.ndarray
    """float32 best score to any other image in the kNN graph (-inf if none was found)."""
    n_edges: int = 0
    """Directed kNN edges above the threshold."""
    edge_src: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """int64 source of every directed edge above the threshold (at most k per source)."""
    edge_dst: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """int64 neighbour of every edge."""
    edge_score: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    """float32 (normalised) score of every edge."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase ("knn", "background", "components")."""

    @property
    def n_components(self) -> int:
        return int(self.keep.sum())


@dataclass
class DecontamResult:
    """Pool images to drop and every (pool, reference) match above the threshold."""

    drop: np.ndarray
    """bool (n_pool,): the image's component in the pool+reference graph contains a reference image."""
    pool_idx: np.ndarray
    """int64 pool index of each matching pair (sorted by pool index, then decreasing score)."""
    ref_idx: np.ndarray
    """int64 reference index of each matching pair."""
    score: np.ndarray
    """float32 cosine similarity of each matching pair (> threshold)."""
    component: np.ndarray
    """int64 (n_pool,) component id in the joint graph (pool indices first, references offset by n_pool)."""


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float, np.floating)) or not np.isfinite(threshold):
        raise ValueError(f"threshold must be a finite float, got {threshold!r}")
    return float(threshold)


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


def background_bias(emb: np.ndarray, background: np.ndarray, background_k: int = 3,
                    index: IndexConfig | None = None) -> np.ndarray:
    """Mean cosine similarity of each embedding to its ``background_k`` nearest background vectors (n,)."""
    bg = as_unit_float32(background, "background")
    if len(bg) == 0:
        raise ValueError("background is empty; pass None to disable score normalisation")
    sims, ids = knn_search(bg, emb, _check_k(background_k), index)
    valid = ids >= 0
    return (np.where(valid, sims, 0.0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)).astype(np.float32)


def _row_best(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best score and neighbour of every kNN row (-inf / -1 for empty rows)."""
    masked = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    col = np.argmax(masked, axis=1)
    rows = np.arange(len(ids))
    best = masked[rows, col]
    return best, np.where(np.isfinite(best), ids[rows, col], -1).astype(np.int64)


def _merge_incoming(best: np.ndarray, partner: np.ndarray, src: np.ndarray, dst: np.ndarray,
                    w: np.ndarray) -> None:
    """Raise ``best``/``partner`` of edge targets whose incoming edge beats their own best (in place)."""
    if not len(dst):
        return
    order = np.lexsort((src, -w, dst))  # per dst: highest score first, then smallest source
    d_sorted = dst[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = d_sorted[1:] != d_sorted[:-1]
    top = order[first]
    better = w[top] > best[dst[top]]
    best[dst[top][better]] = w[top][better]
    partner[dst[top][better]] = src[top][better]


def _keep_one(component: np.ndarray, priority: np.ndarray | None) -> np.ndarray:
    n = len(component)
    if priority is None:
        return component == np.arange(n, dtype=np.int64)
    order = np.lexsort((np.arange(n), -priority, component))
    c_sorted = component[order]
    first = np.ones(n, dtype=bool)
    first[1:] = c_sorted[1:] != c_sorted[:-1]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    return keep


def _check_priority(priority: np.ndarray | None, n: int) -> np.ndarray | None:
    if priority is None:
        return None
    priority = np.asarray(priority, dtype=np.float64).ravel()
    if priority.shape != (n,) or not np.all(np.isfinite(priority)):
        raise ValueError(f"priority must be {n} finite numbers (one per embedding), got shape {priority.shape}")
    return priority


def _result(n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray, best: np.ndarray, partner: np.ndarray,
            threshold: float, priority: np.ndarray | None) -> DedupResult:
    t0 = time.perf_counter()
    component = connected_components(n, src, dst)
    _merge_incoming(best, partner, src, dst, w)
    nearest = np.where(best > threshold, partner, -1).astype(np.int64)
    keep = _keep_one(component, priority)
    log.info("copy detection: %d images, %d edges > %.3f, %d components (%d duplicates removed)",
             n, len(src), threshold, int(keep.sum()), n - int(keep.sum()))
    return DedupResult(component=component, keep=keep, nearest=nearest, score=best.astype(np.float32),
                       n_edges=len(src), edge_src=src, edge_dst=dst, edge_score=np.asarray(w, dtype=np.float32),
                       timings={"components": time.perf_counter() - t0})


def components_from_knn(sims: np.ndarray, ids: np.ndarray, *, threshold: float = 0.6,
                        priority: np.ndarray | None = None, bias: np.ndarray | None = None,
                        beta: float = 1.0) -> DedupResult:
    """Copy-detection result from a self-excluded kNN graph ``(sims, ids)`` of shape (n, k) (see module doc).

    ``bias`` (n,) enables SSCD score normalisation (``background_bias`` of every node). Use this directly when
    the kNN graph was computed elsewhere (e.g. sharded over workers).
    """
    threshold = _check_threshold(threshold)
    if sims.shape != ids.shape or sims.ndim != 2:
        raise ValueError(f"sims and ids must both have shape (n, k), got {sims.shape} and {ids.shape}")
    n = len(ids)
    priority = _check_priority(priority, n)
    ids = np.asarray(ids, dtype=np.int64)
    valid = ids >= 0
    scores = np.asarray(sims, dtype=np.float32)
    if bias is not None:
        if not np.isfinite(beta):
            raise ValueError(f"beta must be finite, got {beta!r}")
        bias = np.asarray(bias, dtype=np.float32).ravel()
        if bias.shape != (n,):
            raise ValueError(f"bias must have one value per node ({n}), got shape {bias.shape}")
        scores = scores - np.float32(beta) * 0.5 * (bias[:, None] + bias[np.where(valid, ids, 0)])
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
    r_idx, c_idx = np.nonzero(valid & (scores > threshold))
    src, dst, w = r_idx.astype(np.int64), ids[r_idx, c_idx], scores[r_idx, c_idx]
    del r_idx, c_idx
    best, partner = _row_best(ids, scores)
    return _result(n, src, dst, w, best, partner, threshold, priority)


def _use_blas_join(cfg: IndexConfig) -> bool:
    if cfg.self_join != "auto":
        return cfg.self_join == "blas"
    return not _want_gpu(cfg)


def copy_detect(emb: np.ndarray, *, k: int = 64, threshold: float = 0.6, index: IndexConfig | None = None,
                priority: np.ndarray | None = None, background: np.ndarray | None = None, beta: float = 1.0,
                background_k: int = 3, progress: bool = False) -> DedupResult:
    """Near-duplicate components of L2-normalised embeddings ``emb`` (n, d); policies in the module docstring.

    The graph comes from :func:`similarity_join` (CPU) or faiss k-NN search (GPU), per ``index.self_join``.
    """
    x = as_unit_float32(emb, "emb")
    k = _check_k(k)
    threshold = _check_threshold(threshold)
    cfg = index or IndexConfig()
    n = len(x)
    priority = _check_priority(priority, n)
    if not np.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta!r}")
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return DedupResult(empty, np.zeros(0, dtype=bool), empty.copy(), np.zeros(0, dtype=np.float32))
    t0 = time.perf_counter()
    bias = None if background is None else background_bias(x, background, background_k, cfg)
    t1 = time.perf_counter()
    if _use_blas_join(cfg):
        g = similarity_join(x, k=k, threshold=threshold, index=cfg, bias=bias, beta=beta, progress=progress)
        res = _result(n, g.src, g.dst, g.score, g.best, g.partner, threshold, priority)
        res.timings.update(g.timings)
    else:
        sims, ids = self_knn(x, k, cfg, progress=progress)
        t2 = time.perf_counter()
        res = components_from_knn(sims, ids, threshold=threshold, priority=priority, bias=bias, beta=beta)
        res.timings["knn"] = t2 - t1
    res.timings["background"] = t1 - t0
    return res


def decontaminate(pool: np.ndarray, refs: np.ndarray, *, k: int = 16, threshold: float = 0.45,
                  index: IndexConfig | None = None, pool_edges: bool = True,
                  progress: bool = False) -> DecontamResult:
    """Drop pool images whose component in the joint pool+reference similarity graph contains a reference.

    Edges (all with cosine > ``threshold``) come from two searches:

    1. every pool image's ``k`` nearest references (an index over ``refs`` only), so a direct pool-reference
       match is never hidden by pool neighbours; these are the reported (pool, ref, score) pairs;
    2. with ``pool_edges`` (default, DINOv2's "same procedure"): the thresholded k-NN graph of pool+refs over
       itself (as in :func:`copy_detect`), so pool-pool edges join components and a pool image is also dropped
       when it is connected through other pool images to a reference (at 0.45 this chains: a copy of a copy
       of a test image is dropped too).
       Pool-reference pairs found by this search are reported as well. With ``pool_edges=False`` only the
       direct matches of search 1 count, i.e. a pool image is dropped iff it matches a reference itself.
    """
    p = as_unit_float32(pool, "pool")
    r = as_unit_float32(refs, "refs")
    k = _check_k(k)
    threshold = _check_threshold(threshold)
    n, m = len(p), len(r)
    if n and m and p.shape[1] != r.shape[1]:
        raise ValueError(f"pool has dimension {p.shape[1]} but refs have {r.shape[1]}")
    if n == 0 or m == 0:
        empty = np.zeros(0, dtype=np.int64)
        return DecontamResult(np.zeros(n, dtype=bool), empty, empty.copy(), np.zeros(0, dtype=np.float32),
                              np.arange(n, dtype=np.int64))
    s, i = knn_search(r, p, min(k, m), index, progress=progress)
    hit = (i >= 0) & (s > threshold)
    rows, cols = np.nonzero(hit)
    pair_p, pair_r, pair_s = rows.astype(np.int64), i[rows, cols], s[rows, cols]
    src, dst = [pair_p], [pair_r + n]
    if pool_edges:
        cfg = index or IndexConfig()
        union = np.concatenate([p, r])
        if _use_blas_join(cfg):
            g = similarity_join(union, k=k, threshold=threshold, index=cfg, progress=progress)
            a, b, w = g.src, g.dst, g.score
        else:
            ss, ii = self_knn(union, k, cfg, progress=progress)
            rows2, cols2 = np.nonzero((ii >= 0) & (ss > threshold))
            a, b, w = rows2.astype(np.int64), ii[rows2, cols2], ss[rows2, cols2]
        del union
        src.append(a)
        dst.append(b)
        cross = (a < n) != (b < n)
        pa, pb, pw = a[cross], b[cross], w[cross]
        pool_side = np.where(pa < n, pa, pb)
        ref_side = np.where(pa < n, pb, pa) - n
        pair_p = np.concatenate([pair_p, pool_side])
        pair_r = np.concatenate([pair_r, ref_side])
        pair_s = np.concatenate([pair_s, pw])
    comp = connected_components(n + m, np.concatenate(src), np.concatenate(dst))
    touched = np.zeros(n + m, dtype=bool)
    touched[comp[n:]] = True
    drop = touched[comp[:n]]
    # unique (pool, ref) pairs, highest score kept, sorted by pool then decreasing score
    order = np.lexsort((-pair_s, pair_r, pair_p))
    pair_p, pair_r, pair_s = pair_p[order], pair_r[order], pair_s[order]
    first = np.ones(len(pair_p), dtype=bool)
    first[1:] = (pair_p[1:] != pair_p[:-1]) | (pair_r[1:] != pair_r[:-1])
    pair_p, pair_r, pair_s = pair_p[first], pair_r[first], pair_s[first]
    order = np.lexsort((pair_r, -pair_s, pair_p))
    log.info("decontaminate: %d pool images, %d references, %d pairs > %.3f, %d pool images dropped",
             n, m, len(order), threshold, int(drop.sum()))
    return DecontamResult(drop=drop, pool_idx=pair_p[order], ref_idx=pair_r[order],
                          score=pair_s[order].astype(np.float32), component=comp[:n])
