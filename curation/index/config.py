"""Index configuration and the rule that turns (vector count, dimension, memory budget) into a faiss index plan.

Rule (``IndexConfig.kind == "auto"``):

* ``n <= exact_max``: exact ``IndexFlatIP`` (brute force, BLAS; quadratic self-search cost but no training).
* otherwise an IVF index with ``nlist = 4 * sqrt(n)`` rounded to the nearest power of two (clamped so that every
  list gets at least ``min_points_per_list`` training points). The codec is ``IVFFlat`` when the raw vectors
  (``4 * n * d`` bytes plus 8-byte ids) fit ``memory_budget_gb``; else ``IVF-PQ`` (``d / 8`` sub-quantizers of
  8 bits, at least 4 dims per sub-quantizer) whose shortlist of ``k * refine_factor`` candidates is re-ranked
  exactly against the caller's base array (which may be an ``np.memmap``), so PQ never decides the final scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["IndexConfig", "IndexPlan", "plan_index"]

_KINDS = ("auto", "flat", "ivf", "ivfpq")


@dataclass(kw_only=True)
class IndexConfig:
    """How nearest-neighbour search is done (faiss, inner product on L2-normalised vectors = cosine)."""

    kind: str = "auto"
    """"auto" (rule in the module docstring), "flat" (exact), "ivf" (IVF, codec chosen by memory) or "ivfpq"."""
    exact_max: int = 50_000
    """With kind="auto": base sets of at most this many vectors use the exact flat index."""
    memory_budget_gb: float = 8.0
    """With IVF: GiB the index may take; IVFFlat if the raw vectors fit, else IVF-PQ with exact refine."""
    nlist: int | None = None
    """IVF lists; None = 4*sqrt(n) rounded to a power of two."""
    nprobe: int = 16
    """IVF lists visited per query (recall/speed trade-off)."""
    min_points_per_list: int = 39
    """IVF training needs at least this many points per list; nlist is lowered to respect it."""
    train_points_per_list: int = 50
    """IVF training sample size per list (the sample is also capped by ``train_max``)."""
    train_max: int = 262_144
    """Upper bound on the IVF training sample (training cost grows with sample x nlist)."""
    train_niter: int = 10
    """k-means iterations for training the IVF coarse quantizer."""
    pq_m: int | None = None
    """IVF-PQ sub-quantizers; None = largest divisor of d that is <= d/8 (min 1)."""
    pq_nbits: int = 8
    """Bits per PQ sub-quantizer code."""
    refine_factor: int = 4
    """IVF-PQ: candidates re-ranked exactly per query = k * refine_factor."""
    self_join: str = "auto"
    """Copy-detection graph: "blas" (thresholded join by matrix products over IVF lists, fast on CPU), "faiss"
    (faiss k-NN search, GPU-capable) or "auto" (faiss when the GPU is used, else blas)."""
    use_gpu: bool | None = None
    """True = faiss GPU (error if none), False = CPU, None = GPU when faiss sees one."""
    query_batch: int = 16_384
    """Queries searched per batch (bounds the result buffer and shows progress)."""
    add_batch: int = 262_144
    """Vectors added to an index per batch."""
    threads: int | None = None
    """faiss OpenMP threads during a call; None = faiss default (all cores)."""
    seed: int = 0
    """Seed for the IVF training sample and coarse quantizer."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"IndexConfig.kind must be one of {_KINDS}, got {self.kind!r}")
        for name in ("exact_max", "min_points_per_list", "train_points_per_list", "train_max", "train_niter",
                     "nprobe", "refine_factor", "query_batch", "add_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"IndexConfig.{name} must be a positive int, got {value!r}")
        if not (isinstance(self.memory_budget_gb, (int, float)) and self.memory_budget_gb > 0):
            raise ValueError(f"IndexConfig.memory_budget_gb must be > 0, got {self.memory_budget_gb!r}")
        for name in ("nlist", "pq_m", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"IndexConfig.{name} must be None or a positive int, got {value!r}")
        if not (isinstance(self.pq_nbits, int) and 1 <= self.pq_nbits <= 16):
            raise ValueError(f"IndexConfig.pq_nbits must be an int in [1, 16], got {self.pq_nbits!r}")
        if self.self_join not in ("auto", "blas", "faiss"):
            raise ValueError(f"IndexConfig.self_join must be 'auto', 'blas' or 'faiss', got {self.self_join!r}")
        if self.use_gpu not in (None, True, False):
            raise ValueError(f"IndexConfig.use_gpu must be true, false or unset, got {self.use_gpu!r}")
        if self.train_points_per_list < self.min_points_per_list:
            raise ValueError("IndexConfig.train_points_per_list must be >= min_points_per_list "
                             f"({self.train_points_per_list} < {self.min_points_per_list})")


@dataclass(frozen=True)
class IndexPlan:
    """The concrete index chosen for a base set: ``kind`` is "flat", "ivfflat" or "ivfpq"."""

    kind: str
    nlist: int = 0
    nprobe: int = 0
    n_train: int = 0
    pq_m: int = 0
    bytes_estimate: int = 0

    def describe(self) -> str:
        if self.kind == "flat":
            return "IndexFlatIP (exact)"
        extra = f",PQ{self.pq_m}x8+refine" if self.kind == "ivfpq" else ",Flat"
        return f"IVF{self.nlist}{extra} nprobe={self.nprobe} train={self.n_train}"


def _pow2_round(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _default_pq_m(d: int) -> int:
    target = max(1, d // 8)
    for m in range(target, 0, -1):
        if d % m == 0:
            return m
    return 1


def plan_index(n: int, d: int, cfg: IndexConfig) -> IndexPlan:
    """Choose the index for ``n`` base vectors of dimension ``d`` under ``cfg`` (see the module docstring)."""
    if n < 1 or d < 1:
        raise ValueError(f"cannot index an empty base set (n={n}, d={d})")
    flat_bytes = 4 * n * d + 8 * n
    kind = cfg.kind
    if kind == "auto":
        kind = "flat" if n <= cfg.exact_max else "ivf"
    if kind == "flat":
        return IndexPlan(kind="flat", bytes_estimate=4 * n * d)
    nlist = cfg.nlist if cfg.nlist is not None else _pow2_round(4.0 * math.sqrt(n))
    nlist = max(1, min(nlist, n // cfg.min_points_per_list))
    n_train = min(n, max(nlist * cfg.train_points_per_list, nlist * cfg.min_points_per_list), cfg.train_max)
    n_train = max(n_train, min(n, nlist * cfg.min_points_per_list))
    nprobe = min(cfg.nprobe, nlist)
    budget = cfg.memory_budget_gb * (1 << 30)
    if kind == "ivf":
        kind = "ivfflat" if flat_bytes + 4 * nlist * d <= budget else "ivfpq"
    if kind == "ivfflat":
        return IndexPlan(kind="ivfflat", nlist=nlist, nprobe=nprobe, n_train=n_train, bytes_estimate=flat_bytes)
    pq_m = cfg.pq_m if cfg.pq_m is not None else _default_pq_m(d)
    if d % pq_m:
        raise ValueError(f"IndexConfig.pq_m={pq_m} must divide the embedding dimension {d}")
    code_bytes = n * (pq_m * cfg.pq_nbits // 8 + 8)
    return IndexPlan(kind="ivfpq", nlist=nlist, nprobe=nprobe, n_train=n_train, pq_m=pq_m, bytes_estimate=code_bytes)
