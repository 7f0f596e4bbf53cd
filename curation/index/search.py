"""Batched cosine k-nearest-neighbour search with faiss (exact flat, IVFFlat, or IVF-PQ re-ranked exactly).

All vectors must be L2-normalised float32 (float16 inputs are converted); inner product is then cosine similarity.
Results follow faiss conventions: rows sorted by decreasing similarity, missing neighbours padded with id -1 and
similarity -inf.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import numpy as np

from curation.index.config import IndexConfig, IndexPlan, plan_index

__all__ = ["as_unit_float32", "build_index", "knn_search", "self_knn", "FaissIndex"]

log = logging.getLogger(__name__)

#: GPU faiss caps k (and nprobe) at this value; larger searches run on the CPU.
GPU_MAX_K = 2048
#: Tolerance on |norm - 1| accepted for "L2-normalised" inputs (float16 storage loses ~1e-3).
NORM_TOL = 1e-2


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss is a hard dependency of curation
        raise ImportError("curation.index needs faiss: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def as_unit_float32(x: np.ndarray, name: str) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (n, d) array after checking it is finite and L2-normalised."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (n, d) with d >= 1, got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be float16/float32/float64, got {x.dtype}")
    out = np.ascontiguousarray(x, dtype=np.float32)
    step = max(1, len(out) // 100_000)  # check a strided sample on huge inputs, everything on small ones
    sample = out[::step]
    norms = np.sqrt(np.einsum("ij,ij->i", sample, sample, dtype=np.float64))
    if not np.all(np.isfinite(norms)):
        raise ValueError(f"{name} contains NaN or inf values")
    if len(norms) and np.max(np.abs(norms - 1.0)) > NORM_TOL:
        raise ValueError(f"{name} must be L2-normalised (row norms in [{norms.min():.3f}, {norms.max():.3f}]); "
                         "divide each row by its norm first")
    return out


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    faiss = _faiss()
    if n is None:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _want_gpu(cfg: IndexConfig) -> bool:
    faiss = _faiss()
    n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if cfg.use_gpu and n_gpu == 0:
        raise ValueError("IndexConfig.use_gpu=true but faiss sees no GPU (install faiss-gpu or set use_gpu=false)")
    return n_gpu > 0 if cfg.use_gpu is None else bool(cfg.use_gpu)


class FaissIndex:
    """A built index over ``base`` plus the plan that made it; ``search`` handles batching and PQ refine."""

    def __init__(self, base: np.ndarray, cfg: IndexConfig) -> None:
        faiss = _faiss()
        self.base = base
        self.cfg = cfg
        n, d = base.shape
        self.plan: IndexPlan = plan_index(n, d, cfg)
        with _threads(cfg.threads):
            index = self._make(faiss, d)
            if self.plan.kind != "flat":
                rng = np.random.default_rng(cfg.seed)
                sample = np.sort(rng.choice(n, size=self.plan.n_train, replace=False))
                index.train(np.ascontiguousarray(base[sample], dtype=np.float32))
                index.nprobe = self.plan.nprobe
            self.gpu = _want_gpu(cfg)
            if self.gpu:  # pragma: no cover - needs faiss-gpu and a GPU
                index = faiss.index_cpu_to_all_gpus(index)
            for start in range(0, n, cfg.add_batch):
                index.add(np.ascontiguousarray(base[start:start + cfg.add_batch], dtype=np.float32))
        self.index = index
        log.info("built %s over %d x %d vectors%s", self.plan.describe(), n, d, " on GPU" if self.gpu else "")

    def _make(self, faiss, d: int):
        plan = self.plan
        if plan.kind == "flat":
            return faiss.IndexFlatIP(d)
        quantizer = faiss.IndexFlatIP(d)
        if plan.kind == "ivfflat":
            index = faiss.IndexIVFFlat(quantizer, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, plan.nlist, plan.pq_m, self.cfg.pq_nbits,
                                     faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.niter = self.cfg.train_niter
            index.pq.cp.seed = self.cfg.seed
        index.cp.niter = self.cfg.train_niter
        index.cp.seed = self.cfg.seed
        index.cp.spherical = True
        self._quantizer = quantizer  # keep the Python wrapper alive alongside the index
        return index

    def _search_batch(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.plan.kind != "ivfpq":
            sims, ids = self.index.search(q, k)
            return sims, ids
        k_short = min(k * self.cfg.refine_factor, self.index.ntotal)
        _, cand = self.index.search(q, k_short)
        return _refine(self.base, q, cand, k)

    def search(self, queries: np.ndarray, k: int, *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """k-NN of every query: (sims float32 (q, k), ids int64 (q, k)); -1 / -inf pad missing neighbours."""
        from tqdm import tqdm

        nq = len(queries)
        sims = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        k_eff = min(k, self.index.ntotal)
        if nq == 0 or k_eff == 0:
            return sims, ids
        if self.gpu and k_eff > GPU_MAX_K:  # pragma: no cover - GPU only
            raise ValueError(f"k={k} exceeds the GPU faiss limit {GPU_MAX_K}; set IndexConfig.use_gpu=false")
        bs = self.cfg.query_batch
        with _threads(self.cfg.threads):
            for start in tqdm(range(0, nq, bs), desc="knn search", unit="batch", disable=not progress):
                q = np.ascontiguousarray(queries[start:start + bs], dtype=np.float32)
                s, i = self._search_batch(q, k_eff)
                s = np.where(i < 0, -np.inf, s).astype(np.float32, copy=False)
                sims[start:start + len(q), :k_eff] = s
                ids[start:start + len(q), :k_eff] = i
        return sims, ids


def _refine(base: np.ndarray, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank candidate ids exactly against ``base`` rows and keep the top ``k`` per query."""
    nq, kc = cand.shape
    d = base.shape[1]
    out_s = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    chunk = max(1, (1 << 24) // max(1, kc * d))  # ~64 MB of gathered float32 vectors per chunk
    for s0 in range(0, nq, chunk):
        c = cand[s0:s0 + chunk]
        valid = c >= 0
        vecs = np.asarray(base[np.where(valid, c, 0).ravel()], dtype=np.float32).reshape(len(c), kc, d)
        sc = np.einsum("qkd,qd->qk", vecs, q[s0:s0 + chunk]).astype(np.float32)
        sc[~valid] = -np.inf
        order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        out_s[s0:s0 + chunk, :order.shape[1]] = np.take_along_axis(sc, order, axis=1)
        ids = np.take_along_axis(c, order, axis=1)
        out_i[s0:s0 + chunk, :order.shape[1]] = np.where(np.isfinite(out_s[s0:s0 + chunk, :order.shape[1]]), ids, -1)
    return out_s, out_i


def build_index(base: np.ndarray, index: IndexConfig | None = None) -> FaissIndex:
    """Build the index chosen by :func:`plan_index` over L2-normalised ``base`` (n, d)."""
    base = as_unit_float32(base, "base")
    return FaissIndex(base, index or IndexConfig())


def knn_search(base: np.ndarray, queries: np.ndarray, k: int, index: IndexConfig | None = None,
               *, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cosine k-NN of ``queries`` in ``base``: (sims float32 (q, k), ids int64 (q, k)), padded with -1 / -inf."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    base = as_unit_float32(base, "base")
    queries = as_unit_float32(queries, "queries")
    if queries.shape[1] != base.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but base has {base.shape[1]}")
    return FaissIndex(base, index or IndexConfig()).search(queries, k, progress=progress)


def self_knn(x: np.ndarray, k: int, index: IndexConfig | None = None, *, progress: bool = False,
             timings: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-NN graph of ``x`` over itself with each point's own id removed: (sims (n, k), ids (n, k)).

    Searches k+1 neighbours and drops the query's own id wherever it appears (exact duplicates may rank it
    anywhere); rows where the approximate index missed it drop their last neighbour instead. Seconds spent
    building and searching go to ``timings["build"]`` / ``timings["search"]`` when a dict is passed.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    x = as_unit_float32(x, "emb")
    n = len(x)
    t0 = time.perf_counter()
    fi = FaissIndex(x, index or IndexConfig())
    t1 = time.perf_counter()
    sims, ids = fi.search(x, k + 1, progress=progress)
    if timings is not None:
        timings.update(build=t1 - t0, search=time.perf_counter() - t1)
    is_self = ids == np.arange(n, dtype=np.int64)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    # stable sort on the mask moves exactly one dropped column per row to the end, keeping the others in order
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)
