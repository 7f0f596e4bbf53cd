"""The part-sized tasks of the retrieve stage (see :mod:`curation.stages.retrieve` for the order).

* ``search-<set>`` (embedding part ``p``): the kept images of the part against every seed of a kNN seed set
  (the seed set is small global state, in every task): the part's ``n_per_seed`` best pool images per seed.
* ``merge-<set>`` (one task): the per-part candidates folded into the ``n_per_seed`` best per seed (seed-set
  sized: S x N, folded a few parts at a time), the ``cap``, the collision statistics; pairs written bucketed by
  uid range.
* ``pick-<set>`` (assignment part ``p``): the part's cluster-retrieval picks (thresholds from
  :mod:`curation.stages.quota`), each credited to the most similar seed of its cluster; bucketed by uid range.
* ``select`` (uid bucket ``b``): ``retrieval/part-b`` (the bucket's pairs in seed-set, seed, rank order) and
  ``selection/part-b`` (one row per uid: knn before cluster before balanced, then the best score; sorted).

Pairs carry three sort columns (seed-set position, seed, rank or leaf index) so that a single bucket holds the
pairs in the order one process writes them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.io.artifacts import kept_embeddings
from curation.io.buckets import read_bucket, write_buckets
from curation.io.fs import join, read_parquet, write_parquet
from curation.io.parts import PartStore, part_name
from curation.schemas import RETRIEVAL, SELECTION
from curation.stages.ingest import bucket_of
from curation.stages.quota import LeafKeys, Thresholds

__all__ = ["PAIRS", "ClusterJob", "KnnJob", "SelectJob", "merge_part", "pick_part", "search_part", "select_part"]

#: Pairs on their way to the uid buckets: the retrieval schema plus its sort columns.
PAIRS = pa.schema([*RETRIEVAL, ("set", pa.int32()), ("seed", pa.int64()), ("order", pa.int64())])
_CANDIDATES = pa.schema([("seed", pa.int64()), ("pos", pa.int64()), ("score", pa.float32()), ("uid", pa.string())])
#: Candidate rows a merge folds at once, in units of the result size (seeds x n_per_seed).
FOLD = 4


def _pairs(name: str, set_pos: int, seed_uids: list[str], uids: list[str], score: np.ndarray, reason: str,
           rank: np.ndarray, seed: np.ndarray, order: np.ndarray) -> pa.Table:  # fmt: skip
    n = len(uids)
    return pa.table({
        "seed_set": pa.array([name] * n, pa.string()), "seed_uid": pa.array(seed_uids, pa.string()),
        "uid": pa.array(uids, pa.string()), "score": pa.array(np.asarray(score, np.float32), pa.float32()),
        "reason": pa.array([reason] * n, pa.string()), "rank": pa.array(np.asarray(rank, np.int32), pa.int32()),
        "set": pa.array(np.full(n, set_pos, np.int32), pa.int32()), "seed": pa.array(np.asarray(seed, np.int64)),
        "order": pa.array(np.asarray(order, np.int64)),
    }, schema=PAIRS)  # fmt: skip


def _write_pairs(url: str, table: pa.Table, n_buckets: int) -> None:
    write_buckets(url, table, np.array(bucket_of(table["uid"].to_pylist(), n_buckets), np.int64), n_buckets)


@dataclass(frozen=True)
class KnnJob:
    """One kNN seed set: its seeds and where its steps write."""

    run_dir: str
    store: PartStore
    config_hash: str
    name: str
    set_pos: int
    seed_uids: list[str]
    seeds: np.ndarray
    n_per_seed: int
    min_score: float | None
    cap: int
    index: Any
    dim: int

    def candidates_url(self, index: int) -> str:
        return join(self.store.work, f"search-{self.name}", part_name(index))

    @property
    def pairs_url(self) -> str:
        return join(self.store.work, "pairs", self.name, part_name(0))


def search_part(job: KnnJob, offsets: list[int], index: int) -> dict[str, Any]:
    """The ``n_per_seed`` best pool images of every seed within embedding part ``index``."""
    from curation.index.search import _threads, knn_search

    t0 = time.perf_counter()
    uids, x = kept_embeddings(job.run_dir, index, job.dim)
    seed, pos, score = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    if uids:
        with _threads(1):  # one faiss thread: the same scores on any node
            sims, ids = knn_search(x, job.seeds, min(job.n_per_seed, len(uids)), job.index)
        mask = ids >= 0
        if job.min_score is not None:
            mask &= sims > job.min_score
        seed, col = np.nonzero(mask)
        pos, score = ids[seed, col], sims[seed, col].astype(np.float32)
    table = pa.table({"seed": pa.array(seed.astype(np.int64)), "pos": pa.array(offsets[index] + pos),
                      "score": pa.array(score, pa.float32()), "uid": pa.array([uids[i] for i in pos], pa.string())},
                     schema=_CANDIDATES)  # fmt: skip
    write_parquet(job.candidates_url(index), table)
    stats = {"part": index, "in": len(uids), "out": table.num_rows, "seconds": round(time.perf_counter() - t0, 3)}
    job.store.mark_done(f"search-{job.name}", index, stats, job.config_hash)
    return stats


def _top(seed: np.ndarray, pos: np.ndarray, score: np.ndarray, uid: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """The ``n`` best candidates per seed (score, then pool position), seed-major, best first; with the ranks."""
    order = np.lexsort((pos, -score, seed))
    seed, pos, score, uid = seed[order], pos[order], score[order], uid[order]
    starts = np.r_[0, np.flatnonzero(np.diff(seed)) + 1] if len(seed) else np.zeros(0, np.int64)
    rank = np.arange(len(seed)) - np.repeat(starts, np.diff(np.r_[starts, len(seed)]))
    keep = rank < n
    return seed[keep], pos[keep], score[keep], uid[keep], rank[keep]


def cap_knn(pos: np.ndarray, score: np.ndarray, cap: int) -> np.ndarray:
    """Mask of pairs kept when at most ``cap`` distinct pool images may be retrieved (best score first)."""
    uniq, inv = np.unique(pos, return_inverse=True)
    if not cap or len(uniq) <= cap:
        return np.ones(len(pos), bool)
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inv, score.astype(np.float64))
    keep = np.zeros(len(uniq), bool)
    keep[np.lexsort((uniq, -best))[:cap]] = True
    return keep[inv]


def set_stats(method: str, n_seeds: int, uids: np.ndarray) -> dict[str, Any]:
    """Collision statistics of one seed set's pairs (pool uids, one per pair)."""
    from curation.index import collision_stats

    uniq, inv, counts = np.unique(uids, return_inverse=True, return_counts=True)
    cs = collision_stats(inv)
    top = np.lexsort((uniq, -counts))[:5]
    return {
        "method": method, "seeds": n_seeds, "pairs": cs.n_pairs, "retrieved": cs.n_unique,
        "collided": cs.n_collided, "max_seeds_per_image": cs.max_count,
        "collision_rate": round(cs.collision_rate, 4),
        "top_collisions": [[str(uniq[i]), int(counts[i])] for i in top if counts[i] > 1],
    }  # fmt: skip


def merge_part(job: KnnJob, n_parts: int, n_buckets: int, index: int) -> dict[str, Any]:
    """Fold the candidates of every part into the pairs of the seed set (see the module docstring)."""
    t0 = time.perf_counter()
    n = job.n_per_seed
    cols: tuple[np.ndarray, ...] = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32),
                                    np.zeros(0, object))  # fmt: skip
    buffer: list[pa.Table] = []
    rows, n_read = 0, 0
    for p in range(n_parts):
        t = read_parquet(job.candidates_url(p), schema=_CANDIDATES)
        buffer.append(t)
        rows += t.num_rows
        n_read += t.num_rows
        if rows >= FOLD * max(1, len(job.seed_uids) * n) or p == n_parts - 1:
            t = pa.concat_tables(buffer)
            more = (t["seed"].to_numpy(), t["pos"].to_numpy(), t["score"].to_numpy(),
                    np.array(t["uid"].to_pylist(), dtype=object))  # fmt: skip
            cols = _top(*(np.concatenate([a, b]) for a, b in zip(cols, more)), n)[:4]
            buffer, rows = [], len(cols[0])
    seed, pos, score, uid = cols
    _, _, _, _, rank = _top(seed, pos, score, uid, n)
    keep = cap_knn(pos, score, job.cap)
    table = _pairs(job.name, job.set_pos, [job.seed_uids[i] for i in seed[keep]], uid[keep].tolist(), score[keep],
                   "knn", rank[keep], seed[keep], rank[keep])  # fmt: skip
    _write_pairs(job.pairs_url, table, n_buckets)
    stats = {"part": index, "in": n_read, "out": table.num_rows,
             **set_stats("knn", len(job.seed_uids), uid[keep].astype(str)),
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done(f"merge-{job.name}", index, stats, job.config_hash)
    return stats


@dataclass(frozen=True)
class ClusterJob:
    """One cluster-method seed set: the seeds' level-1 clusters and the leaf thresholds."""

    run_dir: str
    store: PartStore
    config_hash: str
    name: str
    set_pos: int
    seed_uids: list[str]
    seeds: np.ndarray
    seed_l1: np.ndarray
    take: np.ndarray
    """Pool images retrieved per level-1 cluster."""
    keys: LeafKeys
    thresholds: Thresholds
    dim: int

    def pairs_url(self, index: int) -> str:
        return join(self.store.work, "pairs", self.name, part_name(index))


def pick_part(job: ClusterJob, n_buckets: int, index: int) -> dict[str, Any]:
    """The picks of assignment part ``index``, each with the most similar seed of its cluster."""
    from curation.stages.copygraph import one_blas_thread

    t0 = time.perf_counter()
    t, l1, key, leaf = job.keys.read(index, ("uid",))
    rows = np.flatnonzero(job.thresholds.picked(l1, key, leaf))
    best_seed, best_score = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.float32)
    uids = t["uid"].to_pylist()
    if len(rows):
        kept, x = kept_embeddings(job.run_dir, index, job.dim)
        if kept != uids:
            raise ValueError("clusters/assign does not match the kept pool images; rerun the cluster stage")
        labels = l1[rows]
        for c in np.unique(labels):
            r = np.flatnonzero(labels == c)
            seeds_c = np.flatnonzero(job.seed_l1 == c)
            with one_blas_thread():
                sims = x[rows[r]] @ job.seeds[seeds_c].T
            best_seed[r] = seeds_c[np.argmax(sims, axis=1)]
            best_score[r] = sims.max(axis=1)
    table = _pairs(job.name, job.set_pos, [job.seed_uids[i] for i in best_seed], [uids[i] for i in rows],
                   best_score, "cluster", l1[rows], np.zeros(len(rows), np.int64), leaf[rows])  # fmt: skip
    _write_pairs(job.pairs_url(index), table, n_buckets)
    stats = {"part": index, "in": len(uids), "out": table.num_rows, "seconds": round(time.perf_counter() - t0, 3)}
    job.store.mark_done(f"pick-{job.name}", index, stats, job.config_hash)
    return stats


@dataclass(frozen=True)
class SelectJob:
    """Where the ``select`` tasks read pairs and balanced rows, and write."""

    run_dir: str
    store: PartStore
    config_hash: str
    pair_urls: list[str]
    balanced_urls: list[str]
    """``clusters/balanced`` parts (uid ranges, in order); empty when the balanced sample is not selected."""


def _overlaps(b: int, n_buckets: int, j: int, n_parts: int) -> bool:
    """Whether uid bucket ``b`` of ``n_buckets`` and uid range ``j`` of ``n_parts`` share a 32-bit prefix."""
    lo, hi = (b << 32) // n_buckets, ((b + 1) << 32) // n_buckets
    return max(lo, (j << 32) // n_parts) < min(hi, ((j + 1) << 32) // n_parts)


def _balanced(job: SelectJob, index: int, n_buckets: int) -> pa.Table:
    nb = len(job.balanced_urls)
    tables = [read_parquet(u, schema=SELECTION) for j, u in enumerate(job.balanced_urls)
              if _overlaps(index, n_buckets, j, nb)]  # fmt: skip
    if not tables:
        return SELECTION.empty_table()
    t = pa.concat_tables(tables)
    mine = np.array(bucket_of(t["uid"].to_pylist(), n_buckets), np.int64) == index
    return t.filter(pa.array(mine))


def select_part(job: SelectJob, n_buckets: int, index: int) -> dict[str, Any]:
    """``retrieval/part-<index>`` and ``selection/part-<index>`` of uid bucket ``index``."""
    t0 = time.perf_counter()
    pairs = read_bucket(job.pair_urls, index, PAIRS) if job.pair_urls else PAIRS.empty_table()
    ordered = pairs.sort_by([("set", "ascending"), ("seed", "ascending"), ("order", "ascending")])
    write_parquet(join(job.run_dir, "retrieval", part_name(index)), ordered.select(RETRIEVAL.names).cast(RETRIEVAL))
    prio = pc.if_else(pc.equal(pairs["reason"], "knn"), 0, 1)
    best = pairs.append_column("prio", prio).sort_by([
        ("uid", "ascending"), ("prio", "ascending"), ("score", "descending"), ("seed_set", "ascending"),
        ("seed_uid", "ascending")])  # fmt: skip
    uid = np.array(best["uid"].to_pylist(), dtype=object)
    first = np.flatnonzero(np.r_[True, uid[1:] != uid[:-1]]) if len(uid) else np.zeros(0, np.int64)
    n_seeds = np.diff(np.r_[first, len(uid)]).astype(np.int32)
    top = best.take(pa.array(first, pa.int64()))
    retrieved = pa.table({"uid": top["uid"], "reason": top["reason"], "seed_set": top["seed_set"],
                          "seed_uid": top["seed_uid"], "score": top["score"],
                          "n_seeds": pa.array(n_seeds, pa.int32())}, schema=SELECTION)  # fmt: skip
    balanced = _balanced(job, index, n_buckets) if job.balanced_urls else SELECTION.empty_table()
    balanced = balanced.filter(pc.invert(pc.is_in(balanced["uid"], value_set=retrieved["uid"].combine_chunks())))
    sel = pa.concat_tables([retrieved, balanced]).sort_by("uid")
    write_parquet(join(job.store.output, part_name(index)), sel)
    reasons, counts = np.unique(np.array(sel["reason"].to_pylist(), dtype=str), return_counts=True)
    stats = {"part": index, "in": pairs.num_rows + balanced.num_rows, "out": sel.num_rows,
             "pairs": pairs.num_rows, "reasons": {str(r): int(c) for r, c in zip(reasons, counts)},
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("select", index, stats, job.config_hash)
    return stats
