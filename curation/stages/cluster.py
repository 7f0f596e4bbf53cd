"""Cluster: spherical / hierarchical k-means over the kept (post-dedupe) embeddings, then balanced sampling.

Step ``train`` (one task) draws ``cluster.train_points`` kept embeddings under the run seed and runs
:func:`curation.index.hierarchical_kmeans` (one level without resampling = plain spherical k-means); it writes
``clusters/level{k}/centroids.npy`` and, below the top level, ``clusters/level{k}/parent.npy`` (the level-k+1
cluster of every level-k centroid). Step ``assign`` (one task per embedding part, in parallel) assigns every
kept image of the part to its nearest level-1 centroid and follows the parents up: ``clusters/assign/part-N``
(uid, l1..lK, dist = 1 - cosine to the level-1 centroid), plus the part's level-1 cluster counts; step ``sizes``
sums them. With ``cluster.target_size`` a balanced hierarchical sample (water-filling, the same picks as
:func:`curation.index.balanced_sample` over the whole pool) is drawn by part-sized tasks
(:mod:`curation.stages.balance`) into ``clusters/balanced/part-*`` (selection schema, reason ``balanced``; the
parts are uid ranges, so in order they are sorted by uid; their number is ``balanced_parts`` in the success
record). ``clusters/sizes.json`` holds the level-1 cluster sizes before and after balancing. Deterministic for a
given seed and faiss thread count.

**Memory contract.** No process holds more than one assignment part (``ingest.rows_per_part`` images), the
centroids and per-cluster numbers, or one balanced bucket (``cluster.rows_per_part`` rows): the training task
holds its ``train_points`` sample, an ``assign`` task one embedding part, a ``balance`` round task one part and
a few numbers per level-1 cluster (the driver sums at most :data:`curation.stages.quota.CELLS` histogram
cells), a ``pick`` task one part, a ``balanced`` task one uid bucket. The step data under ``_work/cluster/`` is
deleted once the stage is done (the markers stay).
"""

from __future__ import annotations

import io
import logging
import time
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from curation.config import RunConfig
from curation.io.artifacts import CLUSTERS_DIR, keep_mask, kept_embeddings, load_centroids, n_embedding_parts
from curation.io.fs import atomic_write_bytes, join, write_json, write_parquet
from curation.io.parts import PartStore
from curation.schemas import assign_schema
from curation.stages.balance import run_balanced, save_counts, sum_counts
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.dedupe import DedupeStage

__all__ = ["ClusterStage"]

log = logging.getLogger(__name__)


def _save_npy(url: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(url, buf.getvalue())


def train_part(config: RunConfig, run_dir: str, store: PartStore, config_hash: str, index: int) -> dict[str, Any]:
    """Train the k-means levels on a seeded sample of kept embeddings; write centroids and parent maps."""
    from curation.index import hierarchical_kmeans

    t0 = time.perf_counter()
    cfg = config.cluster
    n_parts, dim = n_embedding_parts(run_dir)
    counts = [int(keep_mask(run_dir, i)[1].sum()) for i in range(n_parts)]
    n = sum(counts)
    first = cfg.levels[0]
    n_train = min(n, cfg.train_points or first.max_points_per_centroid * first.n_clusters)
    if n_train < first.n_clusters:
        raise ValueError(f"cluster.levels[0].n_clusters={first.n_clusters} exceeds the {n_train} kept images "
                         "available for training; lower it")  # fmt: skip
    pick = np.sort(np.random.default_rng(config.seed).choice(n, size=n_train, replace=False))
    rows: list[np.ndarray] = []
    offset = 0
    for i, c in enumerate(counts):
        local = pick[(pick >= offset) & (pick < offset + c)] - offset
        if len(local):
            rows.append(kept_embeddings(run_dir, i, dim)[1][local])
        offset += c
    x = np.concatenate(rows)
    levels = hierarchical_kmeans(x, cfg.levels, seed=config.seed, use_gpu=cfg.use_gpu, threads=cfg.threads or None)
    root = join(run_dir, ClusterStage.output)
    for k, lvl in enumerate(levels, start=1):
        _save_npy(join(root, f"level{k}", "centroids.npy"), lvl.centroids.astype(np.float32))
        if k < len(levels):
            _save_npy(join(root, f"level{k}", "parent.npy"), levels[k].assignment.astype(np.int64))
    stats = {"part": index, "in": n, "out": n_train, "train_points": n_train, "dim": dim,
             "clusters": [int(lvl.centroids.shape[0]) for lvl in levels],
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    store.mark_done("train", index, stats, config_hash)
    return stats


def adopt_part(config: RunConfig, run_dir: str, store: PartStore, config_hash: str, index: int) -> dict[str, Any]:
    """Increment: copy the centroids (and parent maps) of the newest base run with a cluster stage, so new images
    are assigned to the same clusters at every level; nothing is trained."""
    from curation.io.chain import base_chain

    t0 = time.perf_counter()
    cfg = config.cluster
    with_clusters = [b for b in base_chain(config) if b.has_clusters]
    if not with_clusters:
        raise ValueError(f"base run {config.base} and its bases have no finished cluster stage: an increment "
                         "assigns new images to the base centroids, so cluster the base first")  # fmt: skip
    src = with_clusters[-1]
    n_levels = int(src.records[CLUSTERS_DIR]["levels"])
    if n_levels != len(cfg.levels):
        raise ValueError(f"cluster.levels has {len(cfg.levels)} levels, base run {src.run_dir} has {n_levels}")
    cents, parents = load_centroids(src.run_dir, n_levels)
    root = join(run_dir, ClusterStage.output)
    for k, c in enumerate(cents, start=1):
        _save_npy(join(root, f"level{k}", "centroids.npy"), c)
        if k < n_levels:
            _save_npy(join(root, f"level{k}", "parent.npy"), parents[k - 1])
    n_parts, dim = n_embedding_parts(run_dir)
    n = sum(int(keep_mask(run_dir, i)[1].sum()) for i in range(n_parts))
    stats = {"part": index, "in": n, "out": 0, "train_points": 0, "dim": dim, "base_centroids": src.run_dir,
             "clusters": [int(c.shape[0]) for c in cents], "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    store.mark_done("train", index, stats, config_hash)
    return stats


def assign_part(config: RunConfig, run_dir: str, store: PartStore, config_hash: str, index: int) -> dict[str, Any]:
    """Assign every kept image of embedding part ``index`` at every level; write ``clusters/assign/part-N``."""
    from curation.index import assign

    t0 = time.perf_counter()
    cfg = config.cluster
    _, dim = n_embedding_parts(run_dir)
    cents, parents = load_centroids(run_dir, len(cfg.levels))
    uids, x = kept_embeddings(run_dir, index, dim)
    if len(uids):
        labels, dist = assign(x, cents[0], threads=cfg.threads or None)
    else:
        labels, dist = np.zeros(0, np.int64), np.zeros(0, np.float32)
    cols: dict[str, Any] = {"uid": pa.array(uids, pa.string())}
    cur = labels
    for k in range(1, len(cfg.levels) + 1):
        cols[f"l{k}"] = pa.array(cur.astype(np.int32), pa.int32())
        if k < len(cfg.levels):
            cur = parents[k - 1][cur]
    cols["dist"] = pa.array(dist.astype(np.float32), pa.float32())
    write_parquet(store.data_url("clusters/assign", index), pa.table(cols, schema=assign_schema(len(cfg.levels))))
    save_counts(store, index, labels)
    stats = {"part": index, "in": len(uids), "out": len(uids), "seconds": round(time.perf_counter() - t0, 3)}
    store.mark_done("assign", index, stats, config_hash)
    return stats


def _ratio(sizes: np.ndarray) -> float | None:
    nz = sizes[sizes > 0]
    return round(float(nz.max() / nz.min()), 4) if len(nz) else None


@register_stage
class ClusterStage(Stage):
    """Kept embeddings -> ``clusters/`` (centroids per level, assignments, optional balanced sample)."""

    name = "cluster"
    output = CLUSTERS_DIR
    requires = ("dedupe",)
    items_step = "assign"

    def config_sections(self) -> tuple[Any, ...]:
        dedupe = DedupeStage(self.config, self.run_dir, self.prefix)
        increment = (self.config.base,) if self.config.base and not self.prefix else ()
        return (dedupe.config_hash, self.config.cluster, self.config.seed, *increment)

    def _top_up(self, n_new: int) -> int | None:
        """Increment: the balanced sample keeps its base's proportion (balanced / assigned images of the newest base
        run with a balanced sample), so ``n_new`` new images add that fraction of them; ``None`` for a full run."""
        if not self.config.base or self.prefix:
            return None
        from curation.io.chain import base_chain

        recs = [b.records[CLUSTERS_DIR] for b in base_chain(self.config) if b.has_clusters]
        rec = next((r for r in reversed(recs) if r.get("balanced")), None)
        if rec is None or not int(rec["out"]):
            return None
        target = int(n_new * int(rec["balanced"]) / int(rec["out"]) + 0.5)  # half up: a small increment still counts
        log.info("cluster: increment tops up the balanced sample with %d of %d new images (base: %d of %d)",
                 target, n_new, rec["balanced"], rec["out"])  # fmt: skip
        return target

    def run(self, executor: Executor) -> dict[str, Any]:
        cfg = self.config.cluster
        run_dir, store, h = self.run_dir, self.store, self.config_hash
        fit = adopt_part if self.config.base and not self.prefix else train_part
        train = self.run_parts(executor, "train", 1, partial(fit, self.config, run_dir, store, h),
                               num_cpus=cfg.train_cpus)[0]
        n_parts, _ = n_embedding_parts(run_dir)
        assigned = self.run_parts(executor, "assign", n_parts, partial(assign_part, self.config, run_dir, store, h))
        k1 = cfg.levels[0].n_clusters
        before = np.array(self.run_parts(executor, "sizes", 1, partial(sum_counts, store, n_parts, k1, h))[0]["counts"],
                          np.int64)  # fmt: skip
        n = int(before.sum())
        stats: dict[str, Any] = {
            "in": int(train["in"]), "out": n, "rejected": {},
            "levels": len(cfg.levels), "clusters": train["clusters"], "train_points": train["train_points"],
            "assign_parts": n_parts, "size_ratio_before": _ratio(before),
        }  # fmt: skip
        if "base_centroids" in train:
            stats["base_centroids"] = train["base_centroids"]
        sizes: dict[str, Any] = {"level1_before": before.tolist(), "level1_after": None}
        if cfg.target_size:
            _, parents = load_centroids(run_dir, len(cfg.levels))
            urls = [store.data_url("clusters/assign", i) for i in range(n_parts)]
            offsets = np.r_[0, np.cumsum([int(a["out"]) for a in assigned])].astype(int).tolist()
            target = self._top_up(n)
            after, n_bal_parts, n_bal = run_balanced(self, executor, urls, offsets, before, parents, target)
            sizes["level1_after"] = after.tolist()
            stats.update(balanced=n_bal, balanced_parts=n_bal_parts, size_ratio_after=_ratio(after))
        write_json(join(store.output, "sizes.json"), sizes)
        stats["rows"] = {"assign": n, "balanced": stats.get("balanced", 0)}
        store.drop_data()
        return stats
