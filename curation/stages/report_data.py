"""Bounded reads of the whole pool for the report: per-part tasks (plain ``executor.map``, no markers: the report
is redrawn whole) whose results the driver merges, never a table of the pool.

* cluster montages: level-1 sizes are summed from per-part counts of ``clusters/assign/part-N``; the montage
  members are drawn as ranks inside each chosen cluster (in part order), located by the per-part counts of the
  chosen clusters, then read from the parts holding them;
* duplicate groups: per-part component counts of ``dedup/part-N`` are shuffled to the part holding each
  component's first member (component id = its smallest run-wide row number,
  :mod:`curation.io.buckets`); each bucket returns its largest components; the members shown are the first
  ``images_per_cluster`` of each chosen component (kept first, then by uid), merged from per-part candidates;
* retrieval: the distinct seeds and the chosen seeds' best hits are streamed from the retrieval parts (the seed
  sets are small global state).

A task holds one part (or one bucket: the components rooted in one part, merged file by file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io.artifacts import CLUSTERS_DIR, DEDUP_DIR
from curation.io.buckets import bucket_of_ranges, write_buckets
from curation.io.fs import get_fs, join, read_parquet
from curation.io.parts import part_name
from curation.stages.base import Executor

__all__ = [
    "cluster_members",
    "cluster_sizes",
    "component_members",
    "largest_components",
    "retrieval_hits",
    "weakest_links",
]

_COUNTS = pa.schema([("component", pa.int64()), ("count", pa.int64())])


def _assign_l1(run_dir: str, index: int) -> np.ndarray:
    t = read_parquet(join(run_dir, CLUSTERS_DIR, "assign", part_name(index)), columns=["l1"])
    return np.asarray(t["l1"].to_numpy(zero_copy_only=False), np.int64)


def _l1_counts_part(run_dir: str, n_clusters: int, chosen: Sequence[int] | None, index: int) -> dict[str, Any]:
    need = max(n_clusters, max(chosen) + 1 if chosen else 0)
    counts = np.bincount(_assign_l1(run_dir, index), minlength=need)
    return {"part": index, "counts": (counts if chosen is None else counts[list(chosen)]).tolist()}


def _picks_part(run_dir: str, local: Sequence[dict[int, list[int]]], index: int) -> dict[str, Any]:
    """Uids of part ``index`` at ``local[index][c]``: ranks among the part's members of cluster ``c``."""
    l1 = _assign_l1(run_dir, index)
    uids = read_parquet(join(run_dir, CLUSTERS_DIR, "assign", part_name(index)), columns=["uid"])["uid"]
    out = {c: [uids[int(i)].as_py() for i in np.flatnonzero(l1 == c)[ranks]] for c, ranks in local[index].items()}
    return {"part": index, "uids": out}


def _by_part(executor: Executor, fn: Callable[[int], dict[str, Any]], n_parts: int, desc: str
             ) -> list[dict[str, Any]]:  # fmt: skip
    """``fn(i)`` for every part, results in part order (each result is small)."""
    results = {int(r["part"]): r for r in executor.map(fn, list(range(n_parts)), desc=desc)}
    return [results[i] for i in range(n_parts)]


def cluster_sizes(executor: Executor, run_dir: str, n_parts: int, n_clusters: int) -> np.ndarray:
    """Level-1 cluster sizes over every assignment part."""
    sizes = np.zeros(n_clusters, np.int64)
    for r in executor.map(partial(_l1_counts_part, run_dir, n_clusters, None), list(range(n_parts)),
                          desc="report:cluster-sizes"):  # fmt: skip
        counts = np.asarray(r["counts"], np.int64)
        if len(counts) > len(sizes):
            sizes = np.r_[sizes, np.zeros(len(counts) - len(sizes), np.int64)]
        sizes[: len(counts)] += counts
    return sizes


def cluster_members(executor: Executor, run_dir: str, n_parts: int, picks: dict[int, np.ndarray]
                    ) -> dict[int, list[str]]:  # fmt: skip
    """Uids at the sorted ranks ``picks[c]`` (positions among the members of cluster ``c`` in part order)."""
    chosen = sorted(picks)
    per_part = _by_part(executor, partial(_l1_counts_part, run_dir, 0, chosen), n_parts, "report:cluster-counts")
    counts = np.asarray([p["counts"] for p in per_part], np.int64).reshape(n_parts, len(chosen))
    starts = np.vstack([np.zeros((1, len(chosen)), np.int64), np.cumsum(counts, axis=0)])
    local: list[dict[int, list[int]]] = [{} for _ in range(n_parts)]
    for j, c in enumerate(chosen):
        ranks = np.asarray(picks[c], np.int64)
        part = np.searchsorted(starts[:, j], ranks, side="right") - 1
        for i in np.unique(part).tolist():
            local[i][c] = (ranks[part == i] - starts[i, j]).tolist()
    todo = [i for i in range(n_parts) if local[i]]
    members: dict[int, list[str]] = {c: [] for c in chosen}
    results = {int(r["part"]): r for r in executor.map(partial(_picks_part, run_dir, local), todo,
                                                          desc="report:cluster-members")}  # fmt: skip
    for i in todo:  # part order = rank order
        for c, uids in results[i]["uids"].items():
            members[int(c)] += uids
    return members


def _rows(url: str) -> int:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _component_counts_part(run_dir: str, work: str, starts: Sequence[int], index: int) -> dict[str, Any]:
    """Members per component in dedup part ``index``, bucketed by the part holding the component's root."""
    t = read_parquet(join(run_dir, DEDUP_DIR, part_name(index)), columns=["component"])
    vc = pc.value_counts(pc.drop_null(t["component"].combine_chunks()))
    comp = vc.field("values").cast(pa.int64())
    table = pa.table({"component": comp, "count": vc.field("counts").cast(pa.int64())}, schema=_COUNTS)
    bucket = bucket_of_ranges(np.asarray(comp.to_numpy(zero_copy_only=False), np.int64), np.asarray(starts))
    write_buckets(join(work, part_name(index)), table, bucket, len(starts))
    return {"part": index, "in": t.num_rows}


def _top_components_part(work: str, n_files: int, k: int, index: int) -> dict[str, Any]:
    """The ``k`` largest multi-member components of bucket ``index`` (merged one map file at a time)."""
    ids, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for f in range(n_files):
        fs, path = get_fs(join(work, part_name(f)))
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if not pf.metadata.row_group(index).num_rows:
                continue
            piece = pf.read_row_group(index)
        ids, inv = np.unique(np.r_[ids, piece["component"].to_numpy()], return_inverse=True)
        counts = np.bincount(inv, weights=np.r_[counts, piece["count"].to_numpy()]).astype(np.int64)
    multi = counts > 1
    ids, counts = ids[multi], counts[multi]
    top = np.lexsort((ids, -counts))[:k]
    return {"part": index, "top": [[int(ids[i]), int(counts[i])] for i in top]}


def largest_components(executor: Executor, run_dir: str, work: str, n_parts: int, k: int
                       ) -> tuple[int, list[tuple[int, int]]]:  # fmt: skip
    """``(images, [(component, size)])``: the ``k`` largest copy-detection components with more than one member
    (largest first, ties to the smaller id). ``work`` holds the shuffle files (deleted here)."""
    sizes = [_rows(join(run_dir, DEDUP_DIR, part_name(i))) for i in range(n_parts)]
    if not sum(sizes):
        return 0, []
    starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64).tolist()
    try:
        _by_part(executor, partial(_component_counts_part, run_dir, work, starts), n_parts, "report:components")
        tops = _by_part(executor, partial(_top_components_part, work, n_parts, k), n_parts, "report:largest")
    finally:
        fs, path = get_fs(work)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    merged = sorted(((c, s) for t in tops for c, s in t["top"]), key=lambda cs: (-cs[1], cs[0]))
    return sum(sizes), merged[:k]


def _member_rows_part(run_dir: str, chosen: Sequence[int], m: int, index: int) -> dict[str, Any]:
    t = read_parquet(join(run_dir, DEDUP_DIR, part_name(index)), columns=["uid", "component", "keep", "score"])
    t = t.filter(pc.is_in(t["component"], value_set=pa.array(list(chosen), pa.int64())))
    rows: dict[int, list[dict[str, Any]]] = {}
    for r in t.to_pylist():
        rows.setdefault(int(r["component"]), []).append(r)
    return {"part": index, "rows": [r for g in rows.values() for r in sorted(g, key=_member_key)[:m]]}


def _member_key(r: dict[str, Any]) -> tuple[bool, str]:
    return (not r["keep"], r["uid"])


def component_members(executor: Executor, run_dir: str, n_parts: int, chosen: Sequence[int], m: int
                      ) -> dict[int, list[dict[str, Any]]]:  # fmt: skip
    """The first ``m`` members (kept first, then by uid: uid, component, keep, score) of each chosen component."""
    out: dict[int, list[dict[str, Any]]] = {int(c): [] for c in chosen}
    for r in executor.map(partial(_member_rows_part, run_dir, list(chosen), m), list(range(n_parts)),
                          desc="report:component-members"):  # fmt: skip
        for row in r["rows"]:
            out[int(row["component"])].append(row)
    return {c: sorted(g, key=_member_key)[:m] for c, g in out.items()}


def _weakest_part(run_dir: str, chosen: Sequence[int], index: int) -> dict[str, Any]:
    t = read_parquet(join(run_dir, DEDUP_DIR, part_name(index)), columns=["uid", "component", "nearest_uid", "score"])
    t = t.filter(pc.is_in(t["component"], value_set=pa.array(list(chosen), pa.int64())))
    weakest: dict[int, dict[str, Any]] = {}
    for r in t.to_pylist():
        c = int(r["component"])
        if c not in weakest or _weak_key(r) < _weak_key(weakest[c]):
            weakest[c] = r
    return {"part": index, "weakest": list(weakest.values())}


def _weak_key(r: dict[str, Any]) -> tuple[float, str]:
    return (float("-inf") if r["score"] is None else float(r["score"]), r["uid"])


def weakest_links(executor: Executor, run_dir: str, n_parts: int, chosen: Sequence[int]
                  ) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Per chosen component, its most loosely attached member: the one whose best partner (the verified partner
    with verification, else the nearest neighbour) scores lowest, as ``{uid, nearest_uid, score}``."""
    out: dict[int, dict[str, Any]] = {}
    for r in executor.map(partial(_weakest_part, run_dir, list(chosen)), list(range(n_parts)),
                          desc="dedupe:weakest-links"):  # fmt: skip
        for row in r["weakest"]:
            c = int(row["component"])
            if c not in out or _weak_key(row) < _weak_key(out[c]):
                out[c] = row
    return out


def retrieval_hits(run_dir: str, n_parts: int, rng: np.random.Generator, n_seeds: int, m: int
                   ) -> tuple[list[tuple[str, str]], dict[tuple[str, str], list[dict[str, Any]]]]:  # fmt: skip
    """``(chosen seeds, their best m hits each)``: ``n_seeds`` seeds drawn from the sorted distinct seeds that
    retrieved anything, hits best score first (ties in file order); streamed from ``retrieval/part-*``."""
    urls = [join(run_dir, "retrieval", part_name(i)) for i in range(n_parts)]
    seeds: set[tuple[str, str]] = set()
    for url in urls:
        t = read_parquet(url, columns=["seed_set", "seed_uid"])
        seeds.update(zip(t["seed_set"].to_pylist(), t["seed_uid"].to_pylist()))
    if not seeds:
        return [], {}
    ordered = sorted(seeds)
    pick = sorted(rng.choice(len(ordered), size=min(n_seeds, len(ordered)), replace=False).tolist())
    chosen = [ordered[i] for i in pick]
    hits: dict[tuple[str, str], list[dict[str, Any]]] = {s: [] for s in chosen}
    for url in urls:
        t = read_parquet(url)
        t = t.filter(pc.is_in(t["seed_uid"], value_set=pa.array([u for _, u in chosen], pa.string())))
        for r in t.to_pylist():
            if (r["seed_set"], r["seed_uid"]) in hits:
                hits[(r["seed_set"], r["seed_uid"])].append(r)
        for s, h in hits.items():
            hits[s] = sorted(h, key=lambda p: -p["score"])[:m]
    return chosen, hits
