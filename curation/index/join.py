"""Thresholded similarity self-join: the "k-NN graph + threshold" of copy detection, computed with BLAS blocks.

Result: for every vector, its (at most) ``k`` most similar other vectors among those with (normalised) score
strictly above ``threshold``, plus the best score and partner of every vector regardless of the threshold.
This is exactly "k-NN graph, then keep edges > threshold" for the candidates the index visits, but without
a top-k heap over every candidate, which dominates faiss IVF search cost on CPU.

* Exact plan (``IndexConfig`` resolves to flat): query blocks x base blocks, one matrix product each.
* IVF plan: a spherical coarse quantizer of ``nlist`` centroids (trained on a sample) stores every vector in
  its nearest list; every vector probes its ``nprobe`` nearest lists. For each list, one matrix product of the
  vectors probing it against the vectors stored in it - the same candidates faiss ``IndexIVFFlat`` scans,
  scored exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from curation.index.config import IndexConfig, plan_index
from curation.index.search import _faiss, _threads, as_unit_float32

__all__ = ["SimilarityGraph", "similarity_join"]

log = logging.getLogger(__name__)


@dataclass
class SimilarityGraph:
    """Directed edges (query ``src`` -> neighbour ``dst``) with ``score > threshold``, at most k per source."""

    src: np.ndarray
    dst: np.ndarray
    score: np.ndarray
    best: np.ndarray
    """float32 (n,): best score of each vector to any other visited vector (-inf if none)."""
    partner: np.ndarray
    """int64 (n,): the vector achieving ``best`` (-1 if none)."""
    plan: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class _Collector:
    """Accumulates thresholded candidates and per-row best scores block by block."""

    def __init__(self, n: int, threshold: float, bias: np.ndarray | None, beta: float) -> None:
        self.threshold = threshold
        self.bias = bias
        self.beta = np.float32(beta)
        self.best = np.full(n, -np.inf, dtype=np.float32)
        self.partner = np.full(n, -1, dtype=np.int64)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending = 0
        self.compacted = 0
        self.k = 0

    def add(self, q_ids: np.ndarray, m_ids: np.ndarray, sims: np.ndarray) -> None:
        """``sims`` (len(q_ids), len(m_ids)) raw cosines with self pairs already set to -inf."""
        if self.bias is not None:
            sims -= self.beta * np.float32(0.5) * (self.bias[q_ids][:, None] + self.bias[m_ids][None, :])
        col = np.argmax(sims, axis=1)
        row_best = sims[np.arange(len(q_ids)), col]
        better = row_best > self.best[q_ids]  # q_ids are unique inside one block
        self.best[q_ids[better]] = row_best[better]
        self.partner[q_ids[better]] = m_ids[col[better]]
        r, c = np.nonzero(sims > self.threshold)
        if len(r):
            self.parts.append((q_ids[r], m_ids[c], sims[r, c]))
            self.pending += len(r)
            if self.pending > max(self.MAX_PENDING, 2 * self.compacted):  # bound memory on dense data
                self.parts = [self.finish(self.k)]
                self.pending = self.compacted = len(self.parts[0][0])

    #: Candidate edges held before an intermediate top-k compaction.
    MAX_PENDING = 1 << 24

    def finish(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty.copy(), np.zeros(0, dtype=np.float32)
        src = np.concatenate([p[0] for p in self.parts]).astype(np.int64)
        dst = np.concatenate([p[1] for p in self.parts]).astype(np.int64)
        score = np.concatenate([p[2] for p in self.parts]).astype(np.float32)
        self.parts.clear()
        order = np.lexsort((dst, -score, src))  # per source: best first (ties: smaller neighbour id)
        src, dst, score = src[order], dst[order], score[order]
        starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
        rank = np.arange(len(src)) - np.repeat(starts, np.diff(np.r_[starts, len(src)]))
        keep = rank < k
        return src[keep], dst[keep], score[keep]


def _join_flat(x: np.ndarray, col: _Collector, block: int, progress: bool) -> None:
    from tqdm import tqdm

    n = len(x)
    cols = 4 * block
    for qs in tqdm(range(0, n, block), desc="similarity join", unit="block", disable=not progress):
        q_ids = np.arange(qs, min(n, qs + block), dtype=np.int64)
        for ms in range(0, n, cols):
            m_ids = np.arange(ms, min(n, ms + cols), dtype=np.int64)
            sims = x[qs:qs + block] @ x[ms:ms + cols].T
            lo, hi = max(qs, ms), min(q_ids[-1], m_ids[-1]) + 1
            if lo < hi:  # the block holds the diagonal: exclude self pairs
                diag = np.arange(lo, hi)
                sims[diag - qs, diag - ms] = -np.inf
            col.add(q_ids, m_ids, sims)


def _join_ivf(x: np.ndarray, cfg: IndexConfig, nlist: int, nprobe: int, n_train: int, col: _Collector,
              timings: dict[str, float], progress: bool) -> None:
    from tqdm import tqdm

    from curation.index.kmeans import spherical_kmeans

    faiss = _faiss()
    n = len(x)
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(n, size=n_train, replace=False))
    cent = spherical_kmeans(x[sample], nlist, niter=cfg.train_niter, seed=cfg.seed,
                            max_points_per_centroid=max(1, n_train // nlist + 1), use_gpu=False, threads=cfg.threads)
    t1 = time.perf_counter()
    quant = faiss.IndexFlatIP(x.shape[1])
    quant.add(cent)
    probes = np.empty((n, nprobe), dtype=np.int64)
    with _threads(cfg.threads):
        for s in range(0, n, cfg.query_batch):
            probes[s:s + cfg.query_batch] = quant.search(x[s:s + cfg.query_batch], nprobe)[1]
    primary = probes[:, 0]  # storage list = nearest centroid
    t2 = time.perf_counter()
    timings.update(train=t1 - t0, probe=t2 - t1)
    m_order = np.argsort(primary, kind="stable")
    m_bounds = np.searchsorted(primary[m_order], np.arange(nlist + 1))
    flat_lists = probes.ravel()
    q_order = np.argsort(flat_lists, kind="stable")
    q_bounds = np.searchsorted(flat_lists[q_order], np.arange(nlist + 1))
    q_of = q_order // nprobe  # query id for each sorted probe entry
    pos_in_list = np.empty(n, dtype=np.int64)
    pos_in_list[m_order] = np.arange(n) - m_bounds[primary[m_order]]
    del probes, flat_lists, q_order
    for lst in tqdm(range(nlist), desc="similarity join", unit="list", disable=not progress, mininterval=5):
        m_ids = m_order[m_bounds[lst]:m_bounds[lst + 1]]
        q_all = q_of[q_bounds[lst]:q_bounds[lst + 1]]
        if not len(m_ids) or not len(q_all):
            continue
        members = x[m_ids]
        for s in range(0, len(q_all), 8192):
            q_ids = q_all[s:s + 8192]
            sims = x[q_ids] @ members.T
            own = primary[q_ids] == lst
            if own.any():
                sims[np.flatnonzero(own), pos_in_list[q_ids[own]]] = -np.inf
            col.add(q_ids, m_ids, sims)


def similarity_join(x: np.ndarray, *, k: int, threshold: float, index: IndexConfig | None = None,
                    bias: np.ndarray | None = None, beta: float = 1.0, block: int = 2048,
                    progress: bool = False) -> SimilarityGraph:
    """Thresholded k-NN self-join of L2-normalised ``x`` (see the module docstring).

    With ``bias`` (n,), scores are ``cos - beta * (bias_i + bias_j) / 2`` (SSCD normalisation) before the
    threshold and the top-k.
    """
    x = as_unit_float32(x, "emb")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not np.isfinite(threshold) or not np.isfinite(beta):
        raise ValueError(f"threshold and beta must be finite, got {threshold!r} and {beta!r}")
    cfg = index or IndexConfig()
    n = len(x)
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32).ravel()
        if bias.shape != (n,):
            raise ValueError(f"bias must have one value per vector ({n}), got shape {bias.shape}")
    col = _Collector(n, float(threshold), bias, beta)
    col.k = int(k)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = plan_index(n, x.shape[1], cfg) if n else None
    if plan is not None and plan.kind == "flat":
        _join_flat(x, col, block, progress)
    elif plan is not None:  # IVF-PQ plans are about index memory; the join streams lists, so it scores exactly
        _join_ivf(x, cfg, plan.nlist, plan.nprobe, plan.n_train, col, timings, progress)
    # no plan: an empty input has no pairs
    t1 = time.perf_counter()
    src, dst, score = col.finish(k)
    timings.update(join=t1 - t0, topk=time.perf_counter() - t1)
    desc = "exact" if plan is None or plan.kind == "flat" else f"IVF{plan.nlist} nprobe={plan.nprobe} (BLAS join)"
    log.info("similarity join (%s): %d vectors, %d edges > %.3f", desc, n, len(src), threshold)
    return SimilarityGraph(src=src, dst=dst, score=score, best=col.best, partner=col.partner, plan=desc,
                           timings=timings)
