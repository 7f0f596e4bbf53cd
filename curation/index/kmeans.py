"""Spherical k-means (faiss) and batched nearest-centroid assignment on L2-normalised vectors."""

from __future__ import annotations

import logging

import numpy as np

from curation.index.config import IndexConfig
from curation.index.search import _faiss, _threads, _want_gpu, as_unit_float32

__all__ = ["spherical_kmeans", "assign", "lloyd_refine", "INIT_METHODS"]

#: k-means initialisations: faiss random sampling (fast, default), k-means++ (best, O(n k d) sequential: slow
#: for large k) and AFK-MC2 (MCMC approximation of k-means++).
INIT_METHODS = ("random", "kmeans++", "afkmc2")

log = logging.getLogger(__name__)


def _check_pos_int(name: str, value: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def spherical_kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, max_points_per_centroid: int = 256,
                     use_gpu: bool | None = None, init: str = "random", nredo: int = 1,
                     init_centroids: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """Spherical k-means of L2-normalised ``x`` (n, d) into ``k`` unit centroids (k, d) float32.

    faiss ``Kmeans`` trained on at most ``max_points_per_centroid * k`` points drawn under ``seed``, initialised
    by ``init`` (one of :data:`INIT_METHODS`) unless ``init_centroids`` is given, best objective of ``nredo``
    runs; empty clusters are re-seeded by splitting large ones. Deterministic for a given seed and thread count.
    """
    faiss = _faiss()
    x = as_unit_float32(x, "x")
    k = _check_pos_int("k", k)
    niter = _check_pos_int("niter", niter)
    max_points_per_centroid = _check_pos_int("max_points_per_centroid", max_points_per_centroid)
    nredo = _check_pos_int("nredo", nredo)
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {init!r}")
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}; lower the number of clusters")
    gpu = _want_gpu(IndexConfig(use_gpu=use_gpu))
    method = {"random": faiss.ClusteringInitMethod_RANDOM, "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
              "afkmc2": faiss.ClusteringInitMethod_AFK_MC2}[init]
    km = faiss.Kmeans(d, k, niter=niter, seed=int(seed), spherical=True, gpu=gpu, verbose=False, nredo=nredo,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1,
                      init_method=method)
    init = None
    if init_centroids is not None:
        init = as_unit_float32(init_centroids, "init_centroids")
        if init.shape != (k, d):
            raise ValueError(f"init_centroids must have shape {(k, d)}, got {init.shape}")
    with _threads(threads):
        km.train(x, init_centroids=init)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    log.info("spherical k-means: %d x %d -> %d centroids, %d iterations", n, d, k, niter)
    return centroids


def assign(x: np.ndarray, centroids: np.ndarray, batch: int = 65_536, *, use_gpu: bool | None = False,
           threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: (labels int64 (n,), dist float32 (n,) = 1 - cosine similarity)."""
    faiss = _faiss()
    x = as_unit_float32(x, "x")
    c = as_unit_float32(centroids, "centroids")
    batch = _check_pos_int("batch", batch)
    if len(c) == 0:
        raise ValueError("centroids is empty")
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but centroids have {c.shape[1]}")
    index = faiss.IndexFlatIP(c.shape[1])
    if _want_gpu(IndexConfig(use_gpu=use_gpu)):  # pragma: no cover - needs faiss-gpu
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    labels = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float32)
    with _threads(threads):
        for s in range(0, len(x), batch):
            sim, ids = index.search(x[s:s + batch], 1)
            labels[s:s + batch] = ids[:, 0]
            dist[s:s + batch] = 1.0 - sim[:, 0]
    return labels, dist


def lloyd_refine(x: np.ndarray, centroids: np.ndarray, niter: int, *, batch: int = 65_536) -> np.ndarray:
    """``niter`` spherical Lloyd iterations of ``x`` from ``centroids``; clusters left empty keep their centroid.

    Used by resampling steps, where ``x`` holds only a few points per cluster and faiss would re-seed empty
    clusters from random points (which would undo the flattening).
    """
    x = as_unit_float32(x, "x")
    c = as_unit_float32(centroids, "centroids").copy()
    k = len(c)
    for _ in range(_check_pos_int("niter", niter)):
        labels, _ = assign(x, c, batch)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=k)
        present = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[present])[:-1]])
        sums = np.zeros((k, c.shape[1]), dtype=np.float64)
        sums[present] = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
        norms = np.linalg.norm(sums, axis=1)
        ok = (counts > 0) & (norms > 1e-12)
        new = c.copy()
        new[ok] = (sums[ok] / norms[ok, None]).astype(np.float32)
        if np.array_equal(new, c):
            break
        c = new
    return c
