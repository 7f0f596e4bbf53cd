"""Retrieve: pool images near curated seed sets (DINOv2 appendix A.4), and the run's final selection.

Every seed set in ``retrieve.seeds`` is ingested and embedded with the pool's embed model into
``seeds/<name>/`` (the same ingest and embed code, so the same decode and preprocessing). Then, over the images
dedupe kept, as part-sized tasks (:mod:`curation.stages.retrieve_steps`):

* ``method = "knn"`` (large seed sets): the ``n_per_seed`` nearest pool images of every seed (cosine), pairs
  scoring ``<= min_score`` dropped; over ``cap`` distinct images, the best-scoring ones are kept. Each embedding
  part searches the seed set for its own best ``n_per_seed`` per seed (``search-<set>``); one task folds them
  into the best per seed, caps them and counts collisions (``merge-<set>``): :func:`curation.index.retrieve_knn`
  over the whole pool with an exact index.
* ``method = "cluster"`` (small seed sets): each seed is assigned to its level-1 pool cluster (the cluster
  stage's centroids); every cluster holding more than ``min_seeds_per_cluster`` seeds gives ``m_per_cluster``
  pool images (random or closest to the centroid), the per-set ``cap`` split over clusters by water-filling, from
  the cluster sizes alone; the picks per cluster are found by thresholds over the assignment parts
  (``quota-<set>-rK``, :mod:`curation.stages.quota`) and taken per part (``pick-<set>``), each credited to the
  most similar seed of its cluster: :func:`curation.index.retrieve_by_cluster` over the whole pool.

Every pair goes to the uid-range bucket of its pool image; a ``select`` task per bucket writes
``retrieval/part-B`` (every (seed set, seed uid, pool uid, score, reason, rank) pair of the bucket, in seed-set,
seed and rank order) and ``selection/part-B`` (one row per pool uid, sorted; the parts in order are sorted by uid):
the union of every seed set's retrieval and, with ``retrieve.include_balanced`` and a cluster stage that drew a
balanced sample, that sample: the reason is the first of knn, cluster, balanced that applies, the seed the
best-scoring one, ``n_seeds`` the number of seeds that retrieved it. Both part counts are in the success record
(``retrieval_parts``, ``selection_parts``). Stats report collisions (pool images retrieved by several seeds) per
seed set.

**Memory contract.** No process holds more than one embedding or assignment part (``ingest.rows_per_part``
images), the centroids and per-cluster numbers, a seed set (its embeddings, and for kNN its S x ``n_per_seed``
pairs: the ``merge`` task folds :data:`curation.stages.retrieve_steps.FOLD` times that many candidates at once),
or one uid bucket (planned at ``retrieve.rows_per_part`` rows from the most pairs and balanced rows there can be).
The driver holds seed sets, per-cluster numbers and part statistics. The step data under ``_work/retrieve/`` is
deleted once the stage is done (the markers stay).
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from typing import Any

import numpy as np

from curation.config import RunConfig, SeedSet
from curation.io.artifacts import (
    CLUSTERS_DIR,
    SELECTION_DIR,
    balanced_parts,
    kept_counts,
    load_centroids,
    load_embeddings,
    n_embedding_parts,
)
from curation.io.fs import join, read_json
from curation.io.parts import part_name
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.cluster import ClusterStage
from curation.stages.dedupe import DedupeStage
from curation.stages.embed import EmbedStage
from curation.stages.ingest import IngestStage
from curation.stages.quota import LeafKeys, quota_thresholds
from curation.stages.retrieve_steps import (
    ClusterJob,
    KnnJob,
    SelectJob,
    merge_part,
    pick_part,
    search_part,
    select_part,
)

__all__ = [
    "RetrieveStage",
    "SeedEmbedStage",
    "SeedIngestStage",
    "embed_seed_set",
    "seed_prefix",
]

log = logging.getLogger(__name__)


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


@register_stage
class RetrieveStage(Stage):
    """Seed sets + kept pool -> ``retrieval/`` (pairs) and ``selection/`` (one row per selected image)."""

    name = "retrieve"
    output = SELECTION_DIR
    requires = ("dedupe",)
    items_step = "select"

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
        counts = kept_counts(self.run_dir)
        n_pool = sum(counts)
        if not n_pool:
            raise ValueError(f"no kept pool images in {self.run_dir}: nothing to retrieve from")
        offsets = np.r_[0, np.cumsum(counts)].astype(int).tolist()
        n_parts, dim = n_embedding_parts(self.run_dir)
        sets = [(s, *embed_seed_set(self.config, self.run_dir, s, executor)) for s in cfg.seeds]
        jobs: list[KnnJob | ClusterJob] = []
        bound = 0  # most pairs and balanced rows the selection can get: sizes its uid buckets
        for pos, (s, seed_uids, seed_emb) in enumerate(sets):
            if s.method == "knn":
                jobs.append(KnnJob(self.run_dir, self.store, self.config_hash, s.name, pos, seed_uids, seed_emb,
                                   s.n_per_seed, None if s.min_score <= -1.0 else s.min_score, s.cap, cfg.index,
                                   dim))  # fmt: skip
                bound += len(seed_uids) * min(s.n_per_seed, n_pool)
            else:
                job = self._cluster_job(executor, s, pos, seed_uids, seed_emb, offsets, dim)
                jobs.append(job)
                bound += int(job.take.sum())
        balanced = balanced_parts(self.run_dir) if cfg.include_balanced and self.config.cluster.target_size else []
        if balanced:
            bound += int((read_json(join(self.run_dir, CLUSTERS_DIR, "_SUCCESS.json")) or {}).get("balanced", 0))
        n_buckets = max(1, -(-bound // cfg.rows_per_part))
        per_set: dict[str, Any] = {}
        pair_urls: list[str] = []
        for (s, seed_uids, _), job in zip(sets, jobs):
            per_set[s.name] = self._run_set(executor, job, offsets, n_buckets)
            pair_urls += [job.pairs_url] if isinstance(job, KnnJob) else [job.pairs_url(i) for i in range(n_parts)]
            log.info("retrieve %s (%s): %d seeds -> %d pairs, %d distinct pool images", s.name, s.method,
                     len(seed_uids), per_set[s.name]["pairs"], per_set[s.name]["retrieved"])  # fmt: skip
        select = SelectJob(self.run_dir, self.store, self.config_hash, pair_urls, balanced)
        parts = self.run_parts(executor, "select", n_buckets, partial(select_part, select, n_buckets))
        reasons: Counter[str] = Counter()
        for p in parts:
            reasons.update(p["reasons"])
        out, n_pairs = sum(int(p["out"]) for p in parts), sum(int(p["pairs"]) for p in parts)
        self.store.drop_data()
        return {
            "in": n_pool,
            "out": out,
            "rejected": {},
            "seed_sets": per_set,
            "reasons": dict(sorted(reasons.items())),
            "pairs": n_pairs,
            "selection_parts": n_buckets,
            "retrieval_parts": n_buckets,
            "rows": {"selection": out, "retrieval": n_pairs},
        }

    def _cluster_job(self, executor: Executor, s: SeedSet, pos: int, seed_uids: list[str], seed_emb: np.ndarray,
                     offsets: list[int], dim: int) -> ClusterJob:  # fmt: skip
        """Seeds to clusters, the take per cluster (from the cluster sizes) and the leaf thresholds."""
        from curation.index import assign
        from curation.index.retrieval import cluster_take

        cents, _ = load_centroids(self.run_dir, len(self.config.cluster.levels))
        seed_l1, _ = assign(seed_emb, cents[0])
        seed_l1 = np.asarray(seed_l1, np.int64)
        sizes = np.array(read_json(join(self.run_dir, CLUSTERS_DIR, "sizes.json"))["level1_before"], np.int64)
        n_clusters = int(max(np.flatnonzero(sizes)[-1], seed_l1.max())) + 1
        pool_counts = np.zeros(n_clusters, np.int64)
        pool_counts[: min(len(sizes), n_clusters)] = sizes[:n_clusters]
        rng = np.random.default_rng(self.config.seed)
        take, skip = cluster_take(pool_counts, np.bincount(seed_l1, minlength=n_clusters), s.m_per_cluster,
                                  s.min_seeds_per_cluster, s.cap or None, rng)  # fmt: skip
        rec = read_json(join(self.run_dir, CLUSTERS_DIR, "_SUCCESS.json")) or {}
        urls = [join(self.run_dir, CLUSTERS_DIR, "assign", part_name(i)) for i in range(int(rec["assign_parts"]))]
        if len(urls) != len(offsets) - 1:
            raise ValueError("clusters/assign does not match the kept pool images; rerun the cluster stage")
        keys = LeafKeys(urls, offsets, s.pick, self.config.seed, skip)
        th = quota_thresholds(self, executor, f"quota-{s.name}", keys, pool_counts, take)
        return ClusterJob(self.run_dir, self.store, self.config_hash, s.name, pos, seed_uids, seed_emb, seed_l1, take,
                          keys, th, dim)  # fmt: skip

    def _run_set(self, executor: Executor, job: KnnJob | ClusterJob, offsets: list[int], n_buckets: int
                 ) -> dict[str, Any]:  # fmt: skip
        """Run one seed set's steps; its statistics."""
        n_parts = len(offsets) - 1
        if isinstance(job, KnnJob):
            self.run_parts(executor, f"search-{job.name}", n_parts, partial(search_part, job, offsets))
            merged = self.run_parts(executor, f"merge-{job.name}", 1, partial(merge_part, job, n_parts, n_buckets))[0]
            return {k: merged[k] for k in ("method", "seeds", "pairs", "retrieved", "collided",
                                           "max_seeds_per_image", "collision_rate", "top_collisions")}  # fmt: skip
        picked = self.run_parts(executor, f"pick-{job.name}", n_parts, partial(pick_part, job, n_buckets))
        n = sum(int(p["out"]) for p in picked)  # every pool image once: no collisions
        return {"method": "cluster", "seeds": len(job.seed_uids), "pairs": n, "retrieved": n, "collided": 0,
                "max_seeds_per_image": int(n > 0), "collision_rate": 0.0, "top_collisions": []}  # fmt: skip
