"""Balanced hierarchical sampling of the cluster stage as part-sized tasks (same picks as
:func:`curation.index.balanced_sample` over the whole pool).

1. ``sizes`` (one task): sums the per-part level-1 cluster counts written by the ``assign`` tasks.
2. The driver water-fills ``cluster.target_size`` down to the level-1 clusters from those sizes alone
   (:func:`curation.index.level1_allocation`, the run seed's generator drawing the upper levels' tie keys).
3. ``balance-rK`` rounds (:mod:`curation.stages.quota`): the key threshold of every level-1 cluster, so that the
   ``alloc[c]`` leaves of cluster ``c`` with the smallest tie key are picked (random draws after the upper
   levels', or the distance with ``strategy = "closest"``; ties: the earlier leaf).
4. ``pick`` (a task per assignment part): the part's picks, written bucketed by uid range
   (:mod:`curation.io.buckets`); ``balanced`` (a task per bucket): ``clusters/balanced/part-B``, sorted by uid,
   so the parts in order are the whole sample sorted by uid.
"""

from __future__ import annotations

import io
import logging
import time
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from curation.io.buckets import read_bucket, write_buckets
from curation.io.fs import atomic_write_bytes, get_fs, join, write_parquet
from curation.io.parts import PartStore, part_name
from curation.schemas import SELECTION
from curation.stages.base import Executor, Stage
from curation.stages.ingest import bucket_of
from curation.stages.quota import LeafKeys, Thresholds, quota_thresholds

__all__ = ["PICK", "run_balanced", "save_counts", "sum_counts"]

log = logging.getLogger(__name__)

#: Picked rows on their way to the uid-range buckets.
PICK = pa.schema([("uid", pa.string()), ("score", pa.float32())])


def _counts_url(store: PartStore, index: int) -> str:
    return join(store.work, "assign", part_name(index, "npz"))


def save_counts(store: PartStore, index: int, labels: np.ndarray) -> None:
    """Sparse level-1 cluster counts of assignment part ``index`` (read by the ``sizes`` step)."""
    cluster, count = np.unique(labels, return_counts=True)
    buf = io.BytesIO()
    np.savez(buf, cluster=cluster.astype(np.int64), count=count.astype(np.int64))
    atomic_write_bytes(_counts_url(store, index), buf.getvalue())


def sum_counts(store: PartStore, n_parts: int, k1: int, config_hash: str, index: int) -> dict[str, Any]:
    """Level-1 cluster sizes over every assignment part, kept in the step's marker (``k1`` numbers)."""
    t0 = time.perf_counter()
    total = np.zeros(k1, np.int64)
    for p in range(n_parts):
        fs, path = get_fs(_counts_url(store, p))
        with fs.open(path, "rb") as f:
            d = np.load(io.BytesIO(f.read()), allow_pickle=False)
            np.add.at(total, d["cluster"], d["count"])
    stats = {"part": index, "in": int(total.sum()), "out": k1, "counts": total.tolist(),
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    store.mark_done("sizes", index, stats, config_hash)
    return stats


def _pick_url(store: PartStore, index: int) -> str:
    return join(store.work, "pick", part_name(index))


def pick_part(keys: LeafKeys, th: Thresholds, n_buckets: int, store: PartStore, config_hash: str,
              index: int) -> dict[str, Any]:  # fmt: skip
    """The picks of assignment part ``index`` (uid, cosine to the level-1 centroid), bucketed by uid range."""
    t0 = time.perf_counter()
    t, l1, key, leaf = keys.read(index, ("uid",))
    mask = th.picked(l1, key, leaf)
    dist = np.asarray(t["dist"].to_numpy(zero_copy_only=False), np.float64)[mask]
    uids = t["uid"].filter(pa.array(mask))
    table = pa.table({"uid": uids, "score": pa.array((1.0 - dist).astype(np.float32), pa.float32())}, schema=PICK)
    write_buckets(_pick_url(store, index), table, np.array(bucket_of(uids.to_pylist(), n_buckets), np.int64),
                  n_buckets)  # fmt: skip
    stats = {"part": index, "in": t.num_rows, "out": table.num_rows, "seconds": round(time.perf_counter() - t0, 3)}
    store.mark_done("pick", index, stats, config_hash)
    return stats


def balanced_part(store: PartStore, n_parts: int, config_hash: str, index: int) -> dict[str, Any]:
    """``clusters/balanced/part-<index>``: the picks of uid bucket ``index``, sorted by uid."""
    t0 = time.perf_counter()
    t = read_bucket([_pick_url(store, p) for p in range(n_parts)], index, PICK).sort_by("uid")
    n = t.num_rows
    sel = pa.table({"uid": t["uid"], "reason": pa.array(["balanced"] * n, pa.string()),
                    "seed_set": pa.nulls(n, pa.string()), "seed_uid": pa.nulls(n, pa.string()),
                    "score": t["score"], "n_seeds": pa.array(np.zeros(n, np.int32), pa.int32())},
                   schema=SELECTION)  # fmt: skip
    write_parquet(join(store.output, "balanced", part_name(index)), sel)
    stats = {"part": index, "in": n, "out": n, "seconds": round(time.perf_counter() - t0, 3)}
    store.mark_done("balanced", index, stats, config_hash)
    return stats


def run_balanced(stage: Stage, executor: Executor, assign_urls: list[str], offsets: list[int], sizes: np.ndarray,
                 parents: list[np.ndarray], target: int | None = None) -> tuple[np.ndarray, int, int]:  # fmt: skip
    """Draw the balanced sample of ``target`` images (default ``cluster.target_size``) into ``clusters/balanced/``;
    ``(level-1 sizes after, parts, rows)``."""
    from curation.index.balanced import level1_allocation

    cfg, seed = stage.config.cluster, stage.config.seed
    target = cfg.target_size if target is None else target
    n = int(sizes.sum())
    if target >= n:
        if target > n:
            log.warning("balanced sampling: target %d exceeds the pool (%d images); taking all", target, n)
        alloc, skip = sizes.copy(), 0
    else:
        used = len(parents[0]) if parents else int(np.flatnonzero(sizes)[-1]) + 1
        head, skip = level1_allocation(sizes[:used], parents, target, np.random.default_rng(seed))
        alloc = np.zeros(len(sizes), np.int64)
        alloc[:used] = head
    keys = LeafKeys(assign_urls, offsets, cfg.strategy, seed, skip)
    th = quota_thresholds(stage, executor, "balance", keys, sizes, alloc)
    n_buckets = max(1, -(-int(alloc.sum()) // cfg.rows_per_part))
    store, h = stage.store, stage.config_hash
    stage.run_parts(executor, "pick", len(assign_urls), partial(pick_part, keys, th, n_buckets, store, h))
    written = stage.run_parts(executor, "balanced", n_buckets, partial(balanced_part, store, len(assign_urls), h))
    return alloc, n_buckets, sum(int(w["out"]) for w in written)
