"""Copy-graph evaluation shared by ``bench/copy_verify.py`` and the tests.

An image pool (one benchmark half) is embedded with the built-in descriptor; :func:`candidate_pairs` keeps each
image's best neighbours above a threshold, the pairs that pass (verification, or the descriptor score alone in
the single-threshold baseline) are the copy graph's edges, and :func:`pair_scores` compares the graph's
connected components with the ground-truth groups, pair by pair: precision = true pairs among the pairs that
share a component, recall = pairs of a ground-truth group that share a component.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from curation.config import EmbedConfig, VerifyConfig
from curation.decode import DecodeLimits, load_rgb
from curation.verify.features import LocalFeatures, extract, gray_array
from curation.verify.geometry import PairCheck, check_pair

__all__ = ["PairScores", "candidate_pairs", "components", "embed_images", "features_of", "pair_scores",
           "verify_pairs"]  # fmt: skip


@dataclass(frozen=True)
class PairScores:
    """Pair precision / recall of a copy graph against the ground truth."""

    precision: float
    recall: float
    found: int
    """Pairs sharing a predicted component."""
    true: int
    """Pairs sharing a ground-truth group."""
    hits: int
    """Pairs in both."""


def embed_images(blobs: Sequence[bytes], cfg: EmbedConfig | None = None) -> tuple[np.ndarray, float]:
    """Embed encoded images as the embed stage does (``load_rgb`` with the model's draft size, preprocess,
    embed, stored as ``cfg.dtype``); ``(float32 matrix, seconds per image)``."""
    from curation.models import build_embedder

    cfg = cfg or EmbedConfig()
    embedder = build_embedder(cfg)
    limits = DecodeLimits()
    draft = getattr(embedder.preprocess, "draft_size", None)
    t0 = time.perf_counter()
    arrs = [embedder.preprocess(load_rgb(b, limits, draft_size=draft)) for b in blobs]
    emb = embedder.embed(np.stack(arrs)).astype(cfg.dtype).astype(np.float32)
    return emb, (time.perf_counter() - t0) / max(1, len(blobs))


def features_of(blobs: Sequence[bytes], cfg: VerifyConfig) -> tuple[list[LocalFeatures], float]:
    """Decode each image once (at a JPEG draft scale keeping ``max_side``) and extract its local features;
    ``(features, seconds per image)``."""
    limits = DecodeLimits()
    t0 = time.perf_counter()
    out = []
    for b in blobs:
        img = load_rgb(b, limits, draft_size=(cfg.max_side, cfg.max_side))
        out.append(extract(gray_array(img, cfg.max_side), cfg))
    return out, (time.perf_counter() - t0) / max(1, len(blobs))


def candidate_pairs(emb: np.ndarray, threshold: float, max_candidates: int) -> dict[tuple[int, int], float]:
    """``{(i, j): score}`` (i < j) for each image's ``max_candidates`` best neighbours scoring above
    ``threshold`` (a pair is kept when either side ranks the other that high)."""
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    k = min(max_candidates, len(emb) - 1)
    out: dict[tuple[int, int], float] = {}
    if k < 1:
        return out
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    for i, row in enumerate(top):
        for j in row:
            s = float(sims[i, j])
            if s > threshold:
                out[(min(i, int(j)), max(i, int(j)))] = s
    return out


def verify_pairs(pairs: Iterable[tuple[int, int]], feats: Sequence[LocalFeatures],
                 cfg: VerifyConfig) -> tuple[dict[tuple[int, int], PairCheck], float]:  # fmt: skip
    """:func:`check_pair` on every pair; ``(results, seconds per pair)``."""
    t0 = time.perf_counter()
    out = {(i, j): check_pair(feats[i], feats[j], cfg) for i, j in pairs}
    return out, (time.perf_counter() - t0) / max(1, len(out))


def components(n: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes (union-find)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


def _pairs(labels: Sequence[object], members: Sequence[int]) -> set[tuple[int, int]]:
    by: dict[object, list[int]] = {}
    for i in members:
        by.setdefault(labels[i], []).append(i)
    return {p for g in by.values() for p in itertools.combinations(sorted(g), 2)}


def pair_scores(pred: Sequence[object], truth: Sequence[object], focus: Sequence[bool] | None = None) -> PairScores:
    """Pair precision / recall of predicted component labels ``pred`` against ground-truth groups ``truth``.

    ``focus`` (a mask) restricts the count to pairs with at least one focused image (e.g. one edit family).
    """
    members = range(len(pred))
    found, true = _pairs(pred, members), _pairs(truth, members)
    if focus is not None:
        found = {p for p in found if focus[p[0]] or focus[p[1]]}
        true = {p for p in true if focus[p[0]] or focus[p[1]]}
    hits = len(found & true)
    return PairScores(hits / len(found) if found else 1.0, hits / len(true) if true else 1.0, len(found), len(true),
                      hits)  # fmt: skip
