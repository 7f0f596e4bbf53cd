"""The copy-detection graph of the dedupe stage, built by part-sized tasks (no process holds the pool).

Vectors are numbered run-wide in embedding-part order (the *gid*, the index ``copy_detect`` would use). Parts
are grouped into *blocks* of at most ``dedupe.block_rows`` vectors (consecutive parts); a block is the unit of
the reduce, component and write steps and the bucket of every shuffle (:mod:`curation.io.buckets`).

Candidate pairs come from one of two plans, chosen like the in-process index (``IndexConfig.exact_max``):

* **exact** (small pools): the pool is cut into tiles of ``block_rows // 8`` vectors and every pair of tiles is
  one ``join`` task: every pair of vectors is scored once.
* **ivf**: a ``train`` task fits ``nlist`` spherical k-means lists on a seeded sample (``n * replicas /
  list_rows`` lists) and packs the lists into groups of about ``block_rows`` vectors; ``bucket`` tasks (one
  per embedding part) put every vector into its ``replicas`` nearest lists, written bucketed by group; one
  ``join`` task per group then scores every pair inside each of its lists. A pair is found when the two
  vectors share one of their ``replicas`` nearest lists, so neighbours across a list boundary are found too;
  the recall of this against the exact graph is measured on a sample (``recall`` step) and reported.

Each join task keeps, per vector, its ``k`` best edges above the threshold and its best partner, written
bucketed by the block of the source. The ``reduce`` task of a block merges them (highest score, ties to the
smaller id) into exactly what one process visiting the same pairs gets (:mod:`curation.index.blockjoin`).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import DedupeConfig
from curation.io.buckets import bucket_of_ranges, read_bucket, write_buckets
from curation.io.fs import atomic_write_bytes, get_fs, join, read_parquet, write_parquet
from curation.io.parts import PartStore, part_name

__all__ = ["GraphJob", "JOIN", "plan_blocks", "read_part"]

log = logging.getLogger(__name__)

#: Output rows of a join task: ``kind`` 0 = edge src -> dst with score, 1 = best partner of src.
JOIN = pa.schema([("kind", pa.int8()), ("src", pa.int64()), ("dst", pa.int64()), ("score", pa.float32()),
                  ("dst_uid", pa.string())])  # fmt: skip
#: Directed rows of a component graph (both directions of each undirected edge).
EDGES = pa.schema([("u", pa.int64()), ("v", pa.int64())])
#: Per-vector best partner after the reduce (gid order inside a block).
BEST = pa.schema([("gid", pa.int64()), ("best", pa.float32()), ("partner_uid", pa.string())])


def plan_blocks(sizes: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Consecutive part ranges ``[p0, p1)`` of at most ``max_rows`` rows (a larger part is a block alone)."""
    blocks: list[tuple[int, int]] = []
    start, rows = 0, 0
    for p, s in enumerate(sizes):
        if p > start and rows + s > max_rows:
            blocks.append((start, p))
            start, rows = p, 0
        rows += s
    if start < len(sizes):
        blocks.append((start, len(sizes)))
    return blocks


def one_blas_thread() -> Any:
    """Context in which BLAS runs on one thread: matrix products then give bitwise the same scores in every
    task, whatever the executor, node or core count (multi-threaded GEMM changes the rounding)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _vectors(t: pa.Table, dim: int) -> np.ndarray:
    """The ``emb`` column as float32 rows (as stored: float16 storage is not renormalised)."""
    flat = t["emb"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(t.num_rows, dim)


def _stored_dtype(t: pa.Table) -> np.dtype:
    """float16 or float32: the storage type of an embeddings table's vectors."""
    return np.dtype(np.float16) if t.schema.field("emb").type.value_type == pa.float16() else np.dtype(np.float32)


def _as_binary(x: np.ndarray) -> pa.Array:
    """Rows of ``x`` as fixed-size binary values (raw bytes: 10x faster through Parquet than a list column)."""
    x = np.ascontiguousarray(x)
    width = x.shape[1] * x.dtype.itemsize if x.ndim == 2 else 0
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(x), [None, pa.py_buffer(x.tobytes())])


def _from_binary(col: pa.ChunkedArray, dim: int) -> np.ndarray:
    """float32 rows back from :func:`_as_binary` values (float16 or float32 bytes, told apart by the width)."""
    arr = col.combine_chunks()
    width = arr.type.byte_width
    dtype = np.float16 if width == 2 * dim else np.float32
    data = np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr) * dim, offset=arr.offset * width)
    return data.astype(np.float32).reshape(len(arr), dim)


def read_part(url: str, dim: int) -> tuple[list[str], np.ndarray]:
    """Uids and float32 vectors of one embeddings part."""
    t = read_parquet(url)
    return t["uid"].to_pylist(), _vectors(t, dim)


def _save_npy(url: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(url, buf.getvalue())


def _load_npy(url: str) -> np.ndarray:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


@dataclass
class GraphJob:
    """Everything a graph task needs (picklable, sent to every task)."""

    cfg: DedupeConfig
    store: PartStore
    config_hash: str
    part_urls: list[str]
    part_starts: list[int]
    """gid of the first vector of every part, plus the total."""
    dim: int
    blocks: list[tuple[int, int]]
    threshold: float
    """Join threshold: the lower of the copy and the decontamination thresholds when references are set."""
    background: list[str] = field(default_factory=list)
    """Embedding part URLs of the SSCD background set (empty: no score normalisation)."""
    verify: bool = False
    """Geometric verification: the graph's edges are candidates (``candidate_threshold``, ``max_candidates``)."""
    ref_count: int = 0
    """Reference images (decontamination): they take node ids ``0..ref_count-1`` in the decontamination
    graph, pool vectors ``gid + ref_count``, so a component holds a reference iff its label is below it."""
    verify_split: int = 1
    """Verification tasks per block: each block's gid range is cut into this many equal ranges, so the candidate
    pairs of a pool smaller than a block are still checked in parallel (``dedupe.verify_task_pairs``)."""

    @property
    def edge_threshold(self) -> float:
        """Score above which a pair is an edge (a candidate pair with verification)."""
        return self.cfg.candidate_threshold if self.verify else self.cfg.threshold

    @property
    def edge_k(self) -> int:
        """Most edges (candidates with verification) kept per vector."""
        return self.cfg.max_candidates if self.verify else self.cfg.k

    @property
    def n(self) -> int:
        return self.part_starts[-1]

    @property
    def block_starts(self) -> np.ndarray:
        return np.array([self.part_starts[p0] for p0, _ in self.blocks] + [self.n], dtype=np.int64)

    @property
    def verify_starts(self) -> np.ndarray:
        """First gid of every verification task's range (pairs go to the task of their smaller gid), plus n."""
        b = self.block_starts
        cuts = [np.linspace(b[i], b[i + 1], self.verify_split + 1).round().astype(np.int64)[:-1]
                for i in range(len(b) - 1)]  # fmt: skip
        return np.concatenate([*cuts, [self.n]]).astype(np.int64)

    @property
    def verify_tasks(self) -> int:
        """Number of verification tasks."""
        return len(self.blocks) * self.verify_split

    def work(self, *names: str) -> str:
        return join(self.store.work, *names)

    def load_parts(self, p0: int, p1: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Uids, vectors and gids of parts ``[p0, p1)``."""
        uids: list[str] = []
        mats = []
        for p in range(p0, p1):
            u, m = read_part(self.part_urls[p], self.dim)
            uids += u
            mats.append(m)
        x = np.concatenate(mats) if mats else np.zeros((0, self.dim), np.float32)
        return uids, x, np.arange(self.part_starts[p0], self.part_starts[p1], dtype=np.int64)

    def bias(self, x: np.ndarray) -> np.ndarray | None:
        """SSCD background bias of the rows of ``x`` (None without a background set)."""
        if not self.background or not len(x):
            return None
        from curation.index.dedup import background_bias
        from curation.index.search import _threads

        bg = np.concatenate([read_part(u, self.dim)[1] for u in self.background])
        with _threads(1):  # one faiss thread: the same biases on any node
            return background_bias(x, bg, self.cfg.background_k, self.cfg.index)

    def write_join(self, step: str, index: int, res: Any, uid_of: dict[int, str]) -> int:
        """Write a join result bucketed by the block of its source; return the rows written."""
        n_e, n_b = len(res.src), len(res.ids)
        partner_uid = [uid_of.get(int(p)) if p >= 0 else None for p in res.partner]
        table = pa.table({
            "kind": pa.array(np.r_[np.zeros(n_e, np.int8), np.ones(n_b, np.int8)], pa.int8()),
            "src": pa.array(np.r_[res.src, res.ids], pa.int64()),
            "dst": pa.array(np.r_[res.dst, res.partner], pa.int64()),
            "score": pa.array(np.r_[res.score, res.best].astype(np.float32), pa.float32()),
            "dst_uid": pa.array([None] * n_e + partner_uid, pa.string()),
        }, schema=JOIN)  # fmt: skip
        bucket = bucket_of_ranges(table["src"].to_numpy(), self.block_starts)
        write_buckets(self.work(step, part_name(index)), table, bucket, len(self.blocks))
        return table.num_rows


# ---------------------------------------------------------------- exact plan


def exact_tiles(job: GraphJob) -> list[tuple[int, int]]:
    """Part ranges of the exact plan's tiles."""
    sizes = np.diff(job.part_starts).tolist()
    return plan_blocks(sizes, max(1, job.cfg.block_rows // 8))


def exact_pairs(n_tiles: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(n_tiles) for b in range(a, n_tiles)]


def exact_join_part(job: GraphJob, tiles: list[tuple[int, int]], index: int) -> dict[str, Any]:
    """Score every pair of tile ``a`` x tile ``b`` (``index`` numbers the pairs ``a <= b``)."""
    from curation.index.blockjoin import join_blocks

    t0 = time.perf_counter()
    a, b = exact_pairs(len(tiles))[index]
    ua, xa, ga = job.load_parts(*tiles[a])
    uid_of = dict(zip(ga.tolist(), ua))
    with one_blas_thread():
        if a == b:
            res = join_blocks(xa, ga, k=job.edge_k, threshold=job.threshold, bias_a=job.bias(xa), beta=job.cfg.beta)
        else:
            ub, xb, gb = job.load_parts(*tiles[b])
            uid_of.update(zip(gb.tolist(), ub))
            res = join_blocks(xa, ga, xb, gb, k=job.edge_k, threshold=job.threshold, bias_a=job.bias(xa),
                              bias_b=job.bias(xb), beta=job.cfg.beta)  # fmt: skip
    rows = job.write_join("join", index, res, uid_of)
    stats = {"part": index, "in": len(res.ids), "out": rows, "edges": len(res.src),
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("join", index, stats, job.config_hash)
    return stats


# ---------------------------------------------------------------- IVF plan


def ivf_lists(job: GraphJob) -> int:
    """Number of coarse lists: ``n * replicas / list_rows`` (at least 1, at most one per 39 vectors)."""
    cfg = job.cfg
    return int(max(1, min(job.n // 39, round(job.n * cfg.replicas / cfg.list_rows))))


def _lists_of(x: np.ndarray, centroids: np.ndarray, r: int, threads: int | None) -> np.ndarray:
    from curation.index.search import _faiss, _threads

    faiss = _faiss()
    quant = faiss.IndexFlatIP(centroids.shape[1])
    quant.add(centroids)
    with _threads(threads):
        return quant.search(np.ascontiguousarray(x), r)[1]


def _train_sample(job: GraphJob, n_train: int) -> np.ndarray:
    """``n_train`` vectors drawn under the seed from a seeded subset of parts (at least 64 parts, or enough to
    hold twice the sample), so training reads a bounded share of the pool rather than every part."""
    rng = np.random.default_rng(job.cfg.index.seed)
    sizes = np.diff(job.part_starts)
    n_parts = len(sizes)
    want = max(64, int(np.ceil(2 * n_train / max(1.0, sizes.mean()))))
    parts = np.sort(rng.choice(n_parts, size=min(n_parts, want), replace=False))
    offsets = np.r_[0, np.cumsum(sizes[parts])]
    pick = np.sort(rng.choice(int(offsets[-1]), size=min(n_train, int(offsets[-1])), replace=False))
    rows = []
    for j, p in enumerate(parts.tolist()):
        local = pick[(pick >= offsets[j]) & (pick < offsets[j + 1])] - offsets[j]
        if len(local):
            rows.append(read_part(job.part_urls[p], job.dim)[1][local])
    return np.concatenate(rows)


def train_part(job: GraphJob, index: int) -> dict[str, Any]:
    """Coarse lists on a seeded sample, and the packing of lists into join groups of ~``block_rows`` rows."""
    from curation.index.kmeans import spherical_kmeans

    t0 = time.perf_counter()
    cfg = job.cfg
    nlist = ivf_lists(job)
    n_train = int(min(job.n, max(nlist * cfg.index.train_points_per_list, nlist * cfg.index.min_points_per_list)))
    sample = _train_sample(job, n_train)
    n_train = len(sample)
    sample /= np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
    cent = spherical_kmeans(sample, nlist, niter=cfg.index.train_niter, seed=cfg.index.seed,
                            max_points_per_centroid=max(1, n_train // nlist + 1), use_gpu=cfg.index.use_gpu,
                            threads=cfg.index.threads or 1)  # fmt: skip
    lists = _lists_of(sample, cent, min(cfg.replicas, nlist), cfg.index.threads or 1)
    est = np.bincount(lists.ravel(), minlength=nlist) * (job.n / n_train)
    group = np.zeros(nlist, np.int64)
    g, rows_in = 0, 0.0
    for lst in range(nlist):  # consecutive lists while the estimated rows fit a block
        if rows_in and rows_in + est[lst] > cfg.block_rows:
            g, rows_in = g + 1, 0.0
        group[lst] = g
        rows_in += est[lst]
    _save_npy(job.work("ivf", "centroids.npy"), cent.astype(np.float32))
    _save_npy(job.work("ivf", "groups.npy"), group)
    stats = {"part": index, "in": n_train, "out": nlist, "nlist": nlist, "groups": int(g + 1),
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("train", index, stats, job.config_hash)
    return stats


LISTED = [("list", pa.int64()), ("gid", pa.int64()), ("uid", pa.string()), ("bias", pa.float32())]


def bucket_part(job: GraphJob, n_groups: int, index: int) -> dict[str, Any]:
    """Put every vector of embedding part ``index`` into its ``replicas`` nearest lists, bucketed by group."""
    t0 = time.perf_counter()
    cfg = job.cfg
    cent = _load_npy(job.work("ivf", "centroids.npy"))
    group = _load_npy(job.work("ivf", "groups.npy"))
    t = read_parquet(job.part_urls[index])
    x = _vectors(t, job.dim)
    r = min(cfg.replicas, len(cent))
    lists = _lists_of(x, cent, r, cfg.index.threads or 1) if len(x) else np.zeros((0, r), np.int64)
    bias = job.bias(x)
    rows = np.repeat(np.arange(len(x)), r)
    flat = lists.ravel()
    table = pa.table({
        "list": pa.array(flat, pa.int64()),
        "gid": pa.array(job.part_starts[index] + rows, pa.int64()),
        "uid": t["uid"].take(pa.array(rows)),
        "bias": pa.array(np.zeros(len(rows), np.float32) if bias is None else bias[rows], pa.float32()),
        "emb": _as_binary(x[rows].astype(_stored_dtype(t), copy=False)),
    })  # fmt: skip
    write_buckets(job.work("lists", part_name(index)), table, group[flat], n_groups)
    stats = {"part": index, "in": len(x), "out": len(rows), "seconds": round(time.perf_counter() - t0, 3)}
    job.store.mark_done("bucket", index, stats, job.config_hash)
    return stats


def ivf_join_part(job: GraphJob, index: int) -> dict[str, Any]:
    """Score every pair inside each list of group ``index``."""
    from curation.index.blockjoin import BlockJoin, join_blocks, merge_best

    t0 = time.perf_counter()
    urls = [job.work("lists", part_name(p)) for p in range(len(job.part_urls))]
    fs, path = get_fs(urls[0])
    with fs.open(path, "rb") as f:
        schema = pq.ParquetFile(f).schema_arrow
    t = read_bucket(urls, index, schema)
    lst = t["list"].to_numpy()
    gid = t["gid"].to_numpy()
    x = _from_binary(t["emb"], job.dim)
    bias = t["bias"].to_numpy() if job.background else None
    uid_of = dict(zip(gid.tolist(), t["uid"].to_pylist()))
    order = np.lexsort((gid, lst))
    starts = np.flatnonzero(np.r_[True, lst[order][1:] != lst[order][:-1]]) if len(order) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(order)]
    src, dst, score, ids, best, partner = [], [], [], [], [], []
    for s, e in zip(starts.tolist(), ends.tolist()):
        rows = order[s:e]
        with one_blas_thread():
            res = join_blocks(x[rows], gid[rows], k=job.edge_k, threshold=job.threshold,
                              bias_a=None if bias is None else bias[rows], beta=job.cfg.beta)  # fmt: skip
        src.append(res.src), dst.append(res.dst), score.append(res.score)
        ids.append(res.ids), best.append(res.best), partner.append(res.partner)
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    u_ids, u_best, u_partner = merge_best(cat(ids, np.int64), cat(best, np.float32), cat(partner, np.int64))
    res = BlockJoin(src=cat(src, np.int64), dst=cat(dst, np.int64), score=cat(score, np.float32), ids=u_ids,
                    best=u_best, partner=u_partner)  # fmt: skip
    rows_out = job.write_join("join", index, res, uid_of)
    stats = {"part": index, "in": t.num_rows, "out": rows_out, "lists": len(starts), "edges": len(res.src),
             "largest_list": int((ends - starts).max()) if len(starts) else 0,
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("join", index, stats, job.config_hash)
    return stats


# ---------------------------------------------------------------- reduce


def reduce_part(job: GraphJob, n_join: int, decontam: bool, index: int) -> dict[str, Any]:
    """Merge the join outputs of block ``index``: best partners, top-k edges, component-graph rows."""
    from curation.index.blockjoin import merge_best, top_k_edges
    from curation.index.stars import undirected_rows

    t0 = time.perf_counter()
    cfg = job.cfg
    t = read_bucket([job.work("join", part_name(i)) for i in range(n_join)], index, JOIN)
    kind = t["kind"].to_numpy()
    src, dst = t["src"].to_numpy(), t["dst"].to_numpy()
    score = t["score"].to_numpy()
    is_best = kind == 1
    ids, best, partner = merge_best(src[is_best], score[is_best], dst[is_best])
    uid_rows = {(int(s), int(d)): u for s, d, u in zip(src[is_best], dst[is_best],
                                                        t["dst_uid"].filter(pa.array(is_best)).to_pylist())}
    s0, s1 = int(job.block_starts[index]), int(job.block_starts[index + 1])
    full_best = np.full(s1 - s0, -np.inf, np.float32)
    full_best[ids - s0] = best
    partner_uid: list[str | None] = [None] * (s1 - s0)
    for i, p in zip(ids.tolist(), partner.tolist()):
        partner_uid[i - s0] = uid_rows.get((i, p)) if p >= 0 else None
    es, ed, ew = top_k_edges(src[~is_best], dst[~is_best], score[~is_best], job.edge_k)
    dup = ew > job.edge_threshold
    out = {"part": index, "in": s1 - s0, "out": int(dup.sum()), "edges": int(dup.sum())}
    graphs = {"dup": (es[dup], ed[dup], 0)}
    if job.verify:  # candidates go to verification, which writes the graphs' verified edges
        from curation.stages.verify_steps import write_candidates

        out["candidates"] = write_candidates(job, index, es[dup], ed[dup], ew[dup])
        graphs = {}
    elif decontam:
        dec = ew > cfg.decontam_threshold
        graphs["dec"] = (es[dec], ed[dec], job.ref_count)
        out["decontam_edges"] = int(dec.sum())
    for name, (a, b, offset) in graphs.items():
        u, v = undirected_rows(a + offset, b + offset)
        table = pa.table({"u": pa.array(u, pa.int64()), "v": pa.array(v, pa.int64())}, schema=EDGES)
        starts = job.block_starts + offset
        starts[0] = 0
        write_buckets(job.work(f"cc-{name}", "r0", part_name(index)), table, bucket_of_ranges(u, starts),
                      len(job.blocks))
    found = pa.table({"src": pa.array(es[dup], pa.int64()), "dst": pa.array(ed[dup], pa.int64())})
    best_table = pa.table({"gid": pa.array(np.arange(s0, s1), pa.int64()), "best": pa.array(full_best),
                           "partner_uid": pa.array(partner_uid, pa.string())}, schema=BEST)  # fmt: skip
    write_parquet(job.work("found", part_name(index)), found)
    write_parquet(job.work("best", part_name(index)), best_table)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    job.store.mark_done("reduce", index, out, job.config_hash)
    return out
