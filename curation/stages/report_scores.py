"""Score distributions and borderline pairs for the report, as per-part tasks whose small results the driver
merges (the memory contract of :mod:`curation.stages.report_data`: no process holds more than one part).

* ``dedup/part-N`` (uid, nearest_uid, score, keep): each image's best score, counted into fixed bins by kept /
  dropped, and the pairs (image, nearest) just below and just above each threshold. ``nearest_uid`` names only
  copies, so the partners of the ``m`` images just below a threshold are searched in ``embeddings/part-N``: one
  task per part finds the query vectors, one per part scores them against the part (``m`` vectors of state);
* ``verify/part-N`` (uid, other_uid, score, inliers, inlier_ratio, flipped, verdict, reason; written when
  ``dedupe.verify`` is on): the descriptor scores of the candidate pairs by verdict, the pairs just below and
  above each threshold, the copies verified at the lowest scores and the look-alikes rejected at the highest;
* ``retrieval/part-N`` (seed_set, seed_uid, uid, score, ...): the lowest-scoring retrievals of every seed set.

A part returns at most ``m`` rows per list, so the driver merges ``parts x m`` rows per list.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.io.artifacts import DEDUP_DIR, EMBEDDINGS_DIR
from curation.io.fs import exists, join, read_parquet
from curation.io.parts import part_name
from curation.stages.base import Executor

__all__ = ["VERIFY_DIR", "dedup_scores", "nearest_partners", "score_edges", "verify_scores", "worst_retrievals"]

VERIFY_DIR = "verify"
_VERIFY_COLUMNS = ["uid", "other_uid", "score", "inliers", "inlier_ratio", "flipped", "verdict", "reason"]


def score_edges(thresholds: Sequence[float], bins: int = 50) -> np.ndarray:
    """Bin edges over [0, 1] (scores below 0 are counted in the first bin), or [-1, 1] when a threshold is
    negative."""
    lo = -1.0 if min(thresholds, default=0.0) < 0 else 0.0
    return np.linspace(lo, 1.0, bins * (2 if lo < 0 else 1) + 1)


def _hist(scores: np.ndarray, edges: np.ndarray) -> list[int]:
    scores = scores[np.isfinite(scores)]
    return np.histogram(np.clip(scores, edges[0], edges[-1]), edges)[0].astype(int).tolist()


def _near(rows: list[dict[str, Any]], thresholds: Sequence[float], m: int) -> dict[str, list[dict[str, Any]]]:
    """For each threshold ``t``: the ``m`` pairs with the highest scores below it and the lowest at or above it,
    each pair once (``uid``/``other_uid`` in either order)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for t in thresholds:
        below = sorted((r for r in rows if r["score"] < t), key=lambda r: (-r["score"], _key(r)))
        above = sorted((r for r in rows if r["score"] >= t), key=lambda r: (r["score"], _key(r)))
        out[f"below {t:g}"], out[f"above {t:g}"] = _distinct(below, m), _distinct(above, m)
    return out


def _key(r: dict[str, Any]) -> tuple[str, str]:
    return (min(r["uid"], r["other_uid"]), max(r["uid"], r["other_uid"]))


def _distinct(rows: Sequence[dict[str, Any]], m: int) -> list[dict[str, Any]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for r in rows:
        if _key(r) not in seen and len(out) < m:
            seen.add(_key(r))
            out.append(r)
    return out


def _merge(results: Sequence[dict[str, Any]], field: str, m: int, order: Any) -> dict[str, list[dict[str, Any]]]:
    """Per-list merge of the parts' candidates: sorted by ``order(list name)``'s key, each pair once."""
    names = sorted({k for r in results for k in r[field]})
    return {k: _distinct(sorted((row for r in results for row in r[field].get(k, [])), key=order(k)), m)
            for k in names}  # fmt: skip


def _near_order(name: str) -> Any:
    sign = -1 if name.startswith("below") else 1
    return lambda r: (sign * r["score"], _key(r))


def _dedup_part(run_dir: str, edges: np.ndarray, thresholds: Sequence[float], m: int, index: int) -> dict[str, Any]:
    t = read_parquet(join(run_dir, DEDUP_DIR, part_name(index)), columns=["uid", "nearest_uid", "score", "keep"])
    score = np.asarray(t["score"].to_numpy(zero_copy_only=False), np.float64)
    keep = np.asarray(t["keep"].to_numpy(zero_copy_only=False), bool)
    paired = t.filter(pc.is_valid(t["nearest_uid"]))
    rows = [{"uid": u, "other_uid": o, "score": float(s)} for u, o, s in
            zip(paired["uid"].to_pylist(), paired["nearest_uid"].to_pylist(), paired["score"].to_pylist())]  # fmt: skip
    alone = t.filter(pc.is_null(t["nearest_uid"])).select(["uid", "score"]).to_pylist()
    lonely = {f"below {x:g}": sorted((r for r in alone if r["score"] < x), key=lambda r: (-r["score"], r["uid"]))[:m]
              for x in thresholds}  # fmt: skip
    return {"part": index, "kept": _hist(score[keep], edges), "dropped": _hist(score[~keep], edges),
            "near": _near(rows, thresholds, m), "lonely": lonely}  # fmt: skip


def dedup_scores(executor: Executor, run_dir: str, n_parts: int, edges: np.ndarray, thresholds: Sequence[float],
                 m: int) -> dict[str, Any]:  # fmt: skip
    """``{"kept": counts, "dropped": counts, "near": {"below T"|"above T": pairs}}`` over every dedup part: each
    image's best score by whether it was kept, and its (image, nearest) pairs around each threshold."""
    results = list(executor.map(partial(_dedup_part, run_dir, edges, list(thresholds), m), list(range(n_parts)),
                                desc="report:dedup-scores"))  # fmt: skip
    total = {k: np.sum([r[k] for r in results], axis=0).astype(int).tolist() if results else [0] * (len(edges) - 1)
             for k in ("kept", "dropped")}  # fmt: skip
    near = _merge(results, "near", m, _near_order)
    lonely = {k: sorted((x for r in results for x in r["lonely"].get(k, [])), key=lambda x: (-x["score"], x["uid"]))[:m]
              for k in sorted({k for r in results for k in r["lonely"]})}  # fmt: skip
    partners = nearest_partners(executor, run_dir, n_parts, sorted({x["uid"] for xs in lonely.values() for x in xs}))
    for k, xs in lonely.items():
        found = [{"uid": x["uid"], "other_uid": partners[x["uid"]], "score": x["score"]} for x in xs
                 if x["uid"] in partners]  # fmt: skip
        near[k] = _distinct(sorted(near.get(k, []) + found, key=_near_order(k)), m)
    return {**total, "near": near}


def _vectors_part(run_dir: str, uids: Sequence[str], index: int) -> dict[str, Any]:
    url = join(run_dir, EMBEDDINGS_DIR, part_name(index))
    have = read_parquet(url, columns=["uid"])["uid"]
    if not pc.any(pc.is_in(have, value_set=pa.array(list(uids), pa.string()))).as_py():
        return {"part": index, "vectors": {}}
    t = read_parquet(url, columns=["uid", "emb"])
    t = t.filter(pc.is_in(t["uid"], value_set=pa.array(list(uids), pa.string())))
    return {"part": index, "vectors": dict(zip(t["uid"].to_pylist(), _matrix(t).tolist()))}


def _matrix(t: pa.Table) -> np.ndarray:
    flat = t["emb"].combine_chunks()
    x = np.asarray(flat.values.to_numpy(zero_copy_only=False), np.float32).reshape(len(t), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _partners_part(run_dir: str, queries: dict[str, list[float]], index: int) -> dict[str, Any]:
    t = read_parquet(join(run_dir, EMBEDDINGS_DIR, part_name(index)), columns=["uid", "emb"])
    uids = t["uid"].to_pylist()
    if not uids:
        return {"part": index, "best": {}}
    sims = np.asarray(list(queries.values()), np.float32) @ _matrix(t).T
    best = {}
    for q, row in zip(queries, sims):
        row[[i for i, u in enumerate(uids) if u == q]] = -np.inf  # not itself
        j = int(np.argmax(row))
        if np.isfinite(row[j]):
            best[q] = (uids[j], float(row[j]))
    return {"part": index, "best": best}


def nearest_partners(executor: Executor, run_dir: str, n_parts: int, uids: Sequence[str]) -> dict[str, str]:
    """``{uid: its nearest other image}`` by cosine over ``embeddings/part-*`` for a few ``uids``."""
    if not uids:
        return {}
    queries: dict[str, list[float]] = {}
    for r in executor.map(partial(_vectors_part, run_dir, list(uids)), list(range(n_parts)), desc="report:queries"):
        queries.update(r["vectors"])
    best: dict[str, tuple[str, float]] = {}
    for r in executor.map(partial(_partners_part, run_dir, queries), list(range(n_parts)), desc="report:partners"):
        for q, (u, sim) in r["best"].items():
            if q not in best or (sim, u) > (best[q][1], best[q][0]):
                best[q] = (u, sim)
    return {q: u for q, (u, _) in best.items()}


def _verify_part(run_dir: str, edges: np.ndarray, thresholds: Sequence[float], m: int, index: int
                 ) -> dict[str, Any]:  # fmt: skip
    url = join(run_dir, VERIFY_DIR, part_name(index))
    if not exists(url):
        return {"part": index, "copy": [0] * (len(edges) - 1), "not": [0] * (len(edges) - 1), "near": {},
                "extremes": {}}  # fmt: skip
    t = read_parquet(url, columns=_VERIFY_COLUMNS)
    t = t.filter(t["verdict"].is_valid())  # pairs not checked (already connected) have no verdict
    score = np.asarray(t["score"].to_numpy(zero_copy_only=False), np.float64)
    verdict = np.asarray(t["verdict"].to_numpy(zero_copy_only=False), bool)
    rows = [{**r, "score": float(r["score"])} for r in t.to_pylist()]
    copies = sorted((r for r in rows if r["verdict"]), key=lambda r: (r["score"], _key(r)))
    looks = sorted((r for r in rows if not r["verdict"]), key=lambda r: (-r["score"], _key(r)))
    return {"part": index, "copy": _hist(score[verdict], edges), "not": _hist(score[~verdict], edges),
            "near": _near(rows, thresholds, m),
            "extremes": {"copies": _distinct(copies, m), "look-alikes": _distinct(looks, m)}}  # fmt: skip


def _extreme_order(name: str) -> Any:
    sign = 1 if name == "copies" else -1
    return lambda r: (sign * r["score"], _key(r))


def verify_scores(executor: Executor, run_dir: str, n_parts: int, edges: np.ndarray, thresholds: Sequence[float],
                  m: int) -> dict[str, Any]:  # fmt: skip
    """``{"copy": counts, "not": counts, "near": {...}, "extremes": {"copies": lowest-scoring verified pairs,
    "look-alikes": highest-scoring rejected pairs}}`` over ``verify/part-*`` (missing parts count as empty)."""
    results = list(executor.map(partial(_verify_part, run_dir, edges, list(thresholds), m), list(range(n_parts)),
                                desc="report:verify-scores"))  # fmt: skip
    total = {k: np.sum([r[k] for r in results], axis=0).astype(int).tolist() if results else [0] * (len(edges) - 1)
             for k in ("copy", "not")}  # fmt: skip
    return {**total, "near": _merge(results, "near", m, _near_order),
            "extremes": _merge(results, "extremes", m, _extreme_order)}  # fmt: skip


def _worst_part(run_dir: str, m: int, index: int) -> dict[str, Any]:
    t = read_parquet(join(run_dir, "retrieval", part_name(index)), columns=["seed_set", "seed_uid", "uid", "score"])
    out: dict[str, list[dict[str, Any]]] = {}
    for r in t.to_pylist():  # one part
        out.setdefault(r["seed_set"], []).append(r)
    return {"part": index, "worst": {k: sorted(v, key=_worst_key)[:m] for k, v in out.items()}}


def _worst_key(p: dict[str, Any]) -> tuple[float, str, str]:
    return (p["score"], p["uid"], p["seed_uid"])


def worst_retrievals(executor: Executor, run_dir: str, n_parts: int, m: int) -> dict[str, list[dict[str, Any]]]:
    """``{seed set: its m (seed, retrieved image) pairs with the lowest scores}`` over ``retrieval/part-*``."""
    results = list(executor.map(partial(_worst_part, run_dir, m), list(range(n_parts)), desc="report:worst"))
    merged: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        for name, rows in r["worst"].items():
            merged.setdefault(name, []).extend(rows)
    return {name: sorted(rows, key=_worst_key)[:m] for name, rows in sorted(merged.items())}
