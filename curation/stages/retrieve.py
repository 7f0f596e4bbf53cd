"""Retrieve: pool images near curated seed sets (DINOv2 appendix A.4), and the run's final selection.

Every seed set in ``retrieve.seeds`` is ingested and embedded with the pool's embed model into
``seeds/<name>/`` (the same ingest and embed code, so the same decode and preprocessing). Then, over the images
dedupe kept:

* ``method = "knn"`` (large seed sets): the ``n_per_seed`` nearest pool images of every seed (cosine), pairs
  scoring ``<= min_score`` dropped; over ``cap`` distinct images, the best-scoring ones are kept.
* ``method = "cluster"`` (small seed sets): each seed is assigned to its level-1 pool cluster (the cluster
  stage's centroids); every cluster holding more than ``min_seeds_per_cluster`` seeds gives ``m_per_cluster``
  pool images (random or closest to the centroid), the per-set ``cap`` split over clusters by water-filling.
  Each retrieved image is credited to the most similar seed of its cluster.

``retrieval/part-00000`` records every (seed set, seed uid, pool uid, score, reason, rank) pair. The selection
``selection/part-*`` (one row per pool uid, sorted) is the union of every seed set's retrieval and, with
``retrieve.include_balanced`` and a cluster stage that drew a balanced sample, that sample: the reason is the
first of knn, cluster, balanced that applies, the seed the best-scoring one, ``n_seeds`` the number of seeds that
retrieved it. Stats report collisions (pool images retrieved by several seeds) per seed set.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from curation.config import RunConfig, SeedSet
from curation.io.artifacts import (
    CLUSTERS_DIR,
    SELECTION_DIR,
    load_assignments,
    load_centroids,
    load_embeddings,
    load_kept,
)
from curation.io.fs import exists, join, read_parquet, write_parquet
from curation.io.parts import part_name
from curation.schemas import RETRIEVAL, SELECTION
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.cluster import ClusterStage
from curation.stages.dedupe import DedupeStage
from curation.stages.embed import EmbedStage
from curation.stages.ingest import IngestStage

__all__ = [
    "RetrieveStage",
    "SeedEmbedStage",
    "SeedIngestStage",
    "embed_seed_set",
    "seed_prefix",
]

log = logging.getLogger(__name__)

_PRIORITY = {"knn": 0, "cluster": 1, "balanced": 2}
SELECTION_ROWS_PER_PART = 100_000


def seed_prefix(name: str) -> str:
    """Run-directory prefix of a seed set's own ingest and embed outputs."""
    return f"seeds/{name}"


def _seed_set(config: RunConfig, prefix: str) -> SeedSet:
    for s in config.retrieve.seeds:
        if prefix == seed_prefix(s.name):
            return s
    raise ValueError(f"no retrieve.seeds entry for {prefix!r}")


class SeedIngestStage(IngestStage):
    """The ingest stage over a seed set's sources, under ``seeds/<name>/`` (same outputs and resume)."""

    def __init__(self, config: RunConfig, run_dir: str, prefix: str) -> None:
        Stage.__init__(self, config, run_dir, prefix)
        self.sources = list(_seed_set(config, prefix).sources)


class SeedEmbedStage(EmbedStage):
    """The embed stage over a seed set's manifest, with the pool's embed model."""

    requires = ()

    def config_sections(self) -> tuple[Any, ...]:
        return (SeedIngestStage(self.config, self.run_dir, self.prefix).config_hash, self.config.embed)

    def run(self, executor: Executor) -> dict[str, Any]:
        if not SeedIngestStage(self.config, self.run_dir, self.prefix).is_done():
            raise ValueError(f"seed set {self.prefix} has no finished ingest in {self.run_dir}")
        return super().run(executor)


def embed_seed_set(config: RunConfig, run_dir: str, seeds: SeedSet, executor: Executor) -> tuple[list[str], np.ndarray]:
    """Ingest and embed one seed set (resumable); its ``(uids, embeddings)``."""
    prefix = seed_prefix(seeds.name)
    SeedIngestStage(config, run_dir, prefix).execute(executor)
    SeedEmbedStage(config, run_dir, prefix).execute(executor)
    uids, emb, _ = load_embeddings(run_dir, prefix)
    if not uids:
        raise ValueError(f"retrieve.seeds[{seeds.name}]: no usable image in {seeds.sources}")
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return uids, emb


def _cap_knn(si: np.ndarray, pi: np.ndarray, sc: np.ndarray, cap: int) -> np.ndarray:
    """Mask of pairs kept when at most ``cap`` distinct pool images may be retrieved (best score first)."""
    uniq, inv = np.unique(pi, return_inverse=True)
    if not cap or len(uniq) <= cap:
        return np.ones(len(pi), bool)
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inv, sc.astype(np.float64))
    keep = np.zeros(len(uniq), bool)
    keep[np.lexsort((uniq, -best))[:cap]] = True
    return keep[inv]


@register_stage
class RetrieveStage(Stage):
    """Seed sets + kept pool -> ``retrieval/`` (pairs) and ``selection/`` (one row per selected image)."""

    name = "retrieve"
    output = SELECTION_DIR
    requires = ("dedupe",)

    def _needs_cluster(self) -> bool:
        cfg = self.config.retrieve
        uses_balanced = cfg.include_balanced and self.config.cluster.target_size > 0
        return uses_balanced or any(s.method == "cluster" for s in cfg.seeds)

    def config_sections(self) -> tuple[Any, ...]:
        dedupe = DedupeStage(self.config, self.run_dir, self.prefix).config_hash
        cluster = ClusterStage(self.config, self.run_dir, self.prefix).config_hash if self._needs_cluster() else ""
        return (dedupe, cluster, self.config.retrieve, self.config.embed, self.config.ingest, self.config.seed)

    def run(self, executor: Executor) -> dict[str, Any]:
        cfg = self.config.retrieve
        if not cfg.seeds and not self._needs_cluster():
            raise ValueError("retrieve.seeds is empty and there is no balanced sample to select: add a seed set "
                             "([[retrieve.seeds]] name/sources) or set cluster.target_size")  # fmt: skip
        if self._needs_cluster() and not ClusterStage(self.config, self.run_dir, self.prefix).is_done():
            raise ValueError(f"retrieve needs the cluster stage finished first in {self.run_dir} (seed sets with "
                             "method='cluster' or a balanced sample); add 'cluster' before 'retrieve' in stages")
        pool_uids, pool = load_kept(self.run_dir)
        self._parts_total = self._parts_computed = 1
        self._items_computed = len(pool_uids)
        if not pool_uids:
            raise ValueError(f"no kept pool images in {self.run_dir}: nothing to retrieve from")
        pairs: list[pa.Table] = []
        per_set: dict[str, Any] = {}
        for s in cfg.seeds:
            seed_uids, seed_emb = embed_seed_set(self.config, self.run_dir, s, executor)
            table = self._knn(s, seed_uids, seed_emb, pool_uids, pool) if s.method == "knn" else \
                self._cluster(s, seed_uids, seed_emb, pool_uids, pool)  # fmt: skip
            per_set[s.name] = self._set_stats(s, len(seed_uids), table)
            log.info("retrieve %s (%s): %d seeds -> %d pairs, %d distinct pool images", s.name, s.method,
                     len(seed_uids), table.num_rows, per_set[s.name]["retrieved"])  # fmt: skip
            pairs.append(table)
        all_pairs = pa.concat_tables(pairs) if pairs else RETRIEVAL.empty_table()
        write_parquet(join(self.run_dir, "retrieval", part_name(0)), all_pairs)
        selection = self._selection(all_pairs)
        n_sel_parts = max(1, -(-selection.num_rows // SELECTION_ROWS_PER_PART))
        for i in range(n_sel_parts):
            chunk = selection.slice(i * SELECTION_ROWS_PER_PART, SELECTION_ROWS_PER_PART)
            write_parquet(join(self.store.output, part_name(i)), chunk)
        reasons = dict(zip(*np.unique(selection["reason"].to_numpy(zero_copy_only=False), return_counts=True)))
        return {
            "in": len(pool_uids),
            "out": selection.num_rows,
            "rejected": {},
            "seed_sets": per_set,
            "reasons": {str(k): int(v) for k, v in sorted(reasons.items())},
            "pairs": all_pairs.num_rows,
            "selection_parts": n_sel_parts,
            "rows": {"selection": selection.num_rows, "retrieval": all_pairs.num_rows},
        }

    def _knn(self, s: SeedSet, seed_uids: list[str], seed_emb: np.ndarray, pool_uids: list[str],
             pool: np.ndarray) -> pa.Table:  # fmt: skip
        from curation.index import retrieve_knn

        n = min(s.n_per_seed, len(pool_uids))
        si, pi, sc = retrieve_knn(pool, seed_emb, n, self.config.retrieve.index,
                                  min_score=None if s.min_score <= -1.0 else s.min_score)  # fmt: skip
        rank = np.zeros(len(si), np.int32)
        if len(si):  # position of each pair within its seed's row (pairs are seed-major, best first)
            starts = np.r_[0, np.flatnonzero(np.diff(si)) + 1]
            rank = (np.arange(len(si)) - np.repeat(starts, np.diff(np.r_[starts, len(si)]))).astype(np.int32)
        keep = _cap_knn(si, pi, sc, s.cap)
        return self._pairs(s, [seed_uids[i] for i in si[keep]], [pool_uids[i] for i in pi[keep]], sc[keep],
                           "knn", rank[keep])  # fmt: skip

    def _cluster(self, s: SeedSet, seed_uids: list[str], seed_emb: np.ndarray, pool_uids: list[str],
                 pool: np.ndarray) -> pa.Table:  # fmt: skip
        from curation.index import assign, retrieve_by_cluster

        assignments = load_assignments(self.run_dir)
        if assignments["uid"].to_pylist() != pool_uids:
            raise ValueError("clusters/assign does not match the kept pool images; rerun the cluster stage")
        pool_l1 = np.asarray(assignments["l1"].to_numpy(zero_copy_only=False), np.int64)
        pool_dist = np.asarray(assignments["dist"].to_numpy(zero_copy_only=False), np.float64)
        cents, _ = load_centroids(self.run_dir, len(self.config.cluster.levels))
        seed_l1, _ = assign(seed_emb, cents[0])
        picked = retrieve_by_cluster(pool_l1, seed_l1, s.m_per_cluster, s.min_seeds_per_cluster, s.cap or None,
                                     self.config.seed, pool_dist=pool_dist if s.pick == "closest" else None)
        best_seed = np.zeros(len(picked), np.int64)
        best_score = np.zeros(len(picked), np.float32)
        for c in np.unique(pool_l1[picked]):
            rows = np.flatnonzero(pool_l1[picked] == c)
            seeds_c = np.flatnonzero(seed_l1 == c)
            sims = pool[picked[rows]] @ seed_emb[seeds_c].T
            best_seed[rows] = seeds_c[np.argmax(sims, axis=1)]
            best_score[rows] = sims.max(axis=1)
        return self._pairs(s, [seed_uids[i] for i in best_seed], [pool_uids[i] for i in picked], best_score,
                           "cluster", pool_l1[picked].astype(np.int32))  # fmt: skip

    @staticmethod
    def _pairs(s: SeedSet, seed_uids: list[str], uids: list[str], score: np.ndarray, reason: str,
               rank: np.ndarray) -> pa.Table:  # fmt: skip
        n = len(uids)
        return pa.table(
            {
                "seed_set": pa.array([s.name] * n, pa.string()),
                "seed_uid": pa.array(seed_uids, pa.string()),
                "uid": pa.array(uids, pa.string()),
                "score": pa.array(np.asarray(score, np.float32), pa.float32()),
                "reason": pa.array([reason] * n, pa.string()),
                "rank": pa.array(np.asarray(rank, np.int32), pa.int32()),
            },
            schema=RETRIEVAL,
        )

    @staticmethod
    def _set_stats(s: SeedSet, n_seeds: int, table: pa.Table) -> dict[str, Any]:
        from curation.index import collision_stats

        uids = np.asarray(table["uid"].to_numpy(zero_copy_only=False))
        uniq, inv, counts = np.unique(uids, return_inverse=True, return_counts=True)
        cs = collision_stats(inv)
        top = np.lexsort((uniq, -counts))[:5]
        return {
            "method": s.method, "seeds": n_seeds, "pairs": cs.n_pairs, "retrieved": cs.n_unique,
            "collided": cs.n_collided, "max_seeds_per_image": cs.max_count,
            "collision_rate": round(cs.collision_rate, 4),
            "top_collisions": [[str(uniq[i]), int(counts[i])] for i in top if counts[i] > 1],
        }  # fmt: skip

    def _selection(self, pairs: pa.Table) -> pa.Table:
        best: dict[str, tuple[int, float, str, str]] = {}
        n_seeds: dict[str, int] = {}
        for seed_set, seed_uid, uid, score, reason in zip(
            *(pairs[c].to_pylist() for c in ("seed_set", "seed_uid", "uid", "score", "reason"))
        ):
            n_seeds[uid] = n_seeds.get(uid, 0) + 1
            key = (_PRIORITY[reason], -score, seed_set, seed_uid)
            if uid not in best or key < best[uid]:
                best[uid] = key
        rows = [
            {"uid": u, "reason": ("knn", "cluster")[k[0]], "seed_set": k[2], "seed_uid": k[3], "score": -k[1],
             "n_seeds": n_seeds[u]}
            for u, k in best.items()
        ]  # fmt: skip
        balanced_url = join(self.run_dir, CLUSTERS_DIR, "balanced", part_name(0))
        if self.config.retrieve.include_balanced and self.config.cluster.target_size > 0 and exists(balanced_url):
            for row in read_parquet(balanced_url).to_pylist():
                if row["uid"] not in best:
                    rows.append(row)
        rows.sort(key=lambda r: r["uid"])
        return pa.Table.from_pylist(rows, schema=SELECTION)
