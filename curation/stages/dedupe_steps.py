"""The per-block steps of the dedupe stage after the copy graph: decontamination matches, the recall check,
the keep policy and the final write (see :mod:`curation.stages.dedupe` for the order).

* ``refs`` (block ``b``): the block's vectors search every reference image (the reference sets are small
  global state, loaded by every task) for their ``k`` nearest; matches above ``decontam_threshold`` go to
  ``decontam/part-b`` and, as edges to reference nodes, into the decontamination graph.
* ``recall`` (block ``b``): a seeded sample of pool vectors is joined exactly with the block; with the edges
  the graph found for the sampled vectors, the driver measures the recall of the candidate generation.
* ``keep`` (block ``b``) sends ``(component, gid, priority, hit)`` of every vector to the bucket of its
  component; ``resolve`` (bucket ``k``) keeps the highest-priority member of each component (ties: smallest
  gid) and flags components holding a contaminated vector, sent back to the vector's block; ``write`` (block
  ``b``) writes ``dedup/part-p`` for the parts of the block, row-aligned with ``embeddings/part-p``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from curation import schemas
from curation.config import RunConfig
from curation.io.buckets import bucket_of_ranges, read_bucket, write_buckets
from curation.io.fs import exists, read_parquet, write_parquet
from curation.io.parts import part_name
from curation.stages.components import EDGES, LABELS, ComponentGraph
from curation.stages.copygraph import BEST, GraphJob, one_blas_thread, read_part

__all__ = ["RefSet", "keep_part", "recall_part", "refs_part", "resolve_part", "write_part"]

KEEP = pa.schema([("label", pa.int64()), ("block", pa.int64()), ("priority", pa.float64()), ("gid", pa.int64()),
                  ("hit", pa.bool_())])  # fmt: skip
RESOLVED = pa.schema([("label", pa.int64()), ("winner", pa.int64()), ("hit", pa.bool_())])
RECALL = pa.schema([("kind", pa.int8()), ("src", pa.int64()), ("dst", pa.int64()), ("score", pa.float32())])


@dataclass
class RefSet:
    """One reference set of the decontamination: its embedding parts and manifest parts."""

    name: str
    embedding_urls: list[str]
    manifest_urls: list[str]
    threshold: float | None = None
    """Score above which a pool image matches one of these images (``None``: ``dedupe.decontam_threshold``)."""
    k: int | None = None
    """Nearest images of this set searched per pool image (``None``: ``dedupe.k``)."""


def _load_refs(job: GraphJob, refs: list[RefSet]) -> tuple[np.ndarray, list[tuple[str, str, dict[str, Any]]]]:
    """All reference vectors and, per row, (set name, uid, manifest location: uri, container, offset, size)."""
    mats, meta = [], []
    for ref in refs:
        where: dict[str, dict[str, Any]] = {}
        for url in ref.manifest_urls:
            for row in read_parquet(url, columns=["uid", "uri", "container", "offset", "size"]).to_pylist():
                where[row["uid"]] = row
        for url in ref.embedding_urls:
            u, m = read_part(url, job.dim)
            mats.append(m)
            meta += [(ref.name, x, where.get(x, {})) for x in u]
    return (np.concatenate(mats) if mats else np.zeros((0, job.dim), np.float32)), meta


def _verified(job: GraphJob, config: RunConfig, manifest_urls: list[str], index: int, uids: list[str],
              meta: list[tuple[str, str, dict[str, Any]]], pool_i: np.ndarray, ref_i: np.ndarray) -> np.ndarray:
    """Mask of the (pool, reference) matches that pass geometric verification (``dedupe.verify``)."""
    from curation.stages.verify_steps import FeatureCache, _block_locations
    from curation.verify.geometry import check_pair

    _, where = _block_locations(job, manifest_urls, index)
    cache = FeatureCache(config)
    ok = np.zeros(len(pool_i), bool)
    for i, (p, r) in enumerate(zip(pool_i.tolist(), ref_i.tolist())):
        fa = cache.get(uids[p], where[uids[p]])
        fb = cache.get("ref:" + meta[r][1], meta[r][2])
        if not isinstance(fa, str) and not isinstance(fb, str):
            ok[i] = check_pair(fa, fb, config.dedupe.verification).verdict
    return ok


def refs_part(job: GraphJob, refs: list[RefSet], config: RunConfig, manifest_urls: list[str],
              index: int) -> dict[str, Any]:  # fmt: skip
    """Direct matches of block ``index`` against every reference image (see the module docstring); with
    ``dedupe.verify`` only the matches that pass geometric verification count."""
    from curation.index.search import _threads, knn_search
    from curation.index.stars import undirected_rows

    t0 = time.perf_counter()
    cfg = job.cfg
    ref_x, meta = _load_refs(job, refs)
    uids, x, gids = job.load_parts(*job.blocks[index])
    pool_i, ref_i, score = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    start = 0
    for ref in refs:  # each set searched on its own: its own k and threshold
        n_ref = sum(1 for m in meta if m[0] == ref.name)
        sub = ref_x[start:start + n_ref]
        if len(x) and n_ref:
            k = min(ref.k or cfg.k, n_ref)
            with _threads(1):  # one faiss thread: the same scores on any node
                sims, ids = knn_search(sub, x, k, cfg.index)
            thr = cfg.decontam_threshold if ref.threshold is None else ref.threshold
            rows, cols = np.nonzero((ids >= 0) & (sims > thr))
            pool_i = np.r_[pool_i, rows.astype(np.int64)]
            ref_i = np.r_[ref_i, ids[rows, cols].astype(np.int64) + start]
            score = np.r_[score, sims[rows, cols].astype(np.float32)]
        start += n_ref
    candidates = len(pool_i)
    if job.verify and candidates:
        ok = _verified(job, config, manifest_urls, index, uids, meta, pool_i, ref_i)
        pool_i, ref_i, score = pool_i[ok], ref_i[ok], score[ok]
    report = sorted(({"uid": uids[p], "reference": meta[r][0], "ref_uid": meta[r][1], "ref_uri": meta[r][2].get("uri"),
                      "score": float(s)} for p, r, s in zip(pool_i.tolist(), ref_i.tolist(), score.tolist())),
                    key=lambda d: (d["reference"], d["uid"], d["ref_uid"]))  # fmt: skip
    write_parquet(job.store.data_url("decontam", index), pa.Table.from_pylist(report, schema=schemas.DECONTAM))
    u, v = undirected_rows(gids[pool_i] + job.ref_count, ref_i)
    starts = job.block_starts + job.ref_count
    starts[0] = 0
    table = pa.table({"u": pa.array(u, pa.int64()), "v": pa.array(v, pa.int64())}, schema=EDGES)
    write_buckets(job.work("cc-dec", "refs", part_name(index)), table, bucket_of_ranges(u, starts), len(job.blocks))
    stats = {"part": index, "in": len(x), "out": len(report), "matched": int(len(np.unique(pool_i))),
             "candidates": candidates,
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("refs", index, stats, job.config_hash)
    return stats


def recall_sample(job: GraphJob) -> tuple[np.ndarray, np.ndarray]:
    """``(gids, vectors)`` of the seeded recall sample: rows drawn from up to 8 randomly chosen parts."""
    rng = np.random.default_rng(job.cfg.index.seed + 1)
    n_parts = len(job.part_urls)
    sizes = np.diff(job.part_starts)
    chosen = np.sort(rng.choice(n_parts, size=min(n_parts, 8), replace=False))
    per = max(1, -(-job.cfg.recall_sample // len(chosen)))
    gids, mats = [], []
    for p in chosen.tolist():
        if not sizes[p]:
            continue
        rows = np.sort(rng.choice(sizes[p], size=min(per, sizes[p]), replace=False))
        gids.append(job.part_starts[p] + rows)
        mats.append(read_part(job.part_urls[p], job.dim)[1][rows])
    if not gids:
        return np.zeros(0, np.int64), np.zeros((0, job.dim), np.float32)
    return np.concatenate(gids), np.concatenate(mats)


def recall_part(job: GraphJob, sample: tuple[np.ndarray, np.ndarray], index: int) -> dict[str, Any]:
    """Exact edges of the sample against block ``index`` and the found edges of the sampled block vectors."""
    from curation.index.blockjoin import top_k_edges

    t0 = time.perf_counter()
    cfg = job.cfg
    s_gid, s_x = sample
    _, x, gids = job.load_parts(*job.blocks[index])
    with one_blas_thread():
        sims = s_x @ x.T
    if job.background:
        sims -= cfg.beta * np.float32(0.5) * (job.bias(s_x)[:, None] + job.bias(x)[None, :])
    sims[s_gid[:, None] == gids[None, :]] = -np.inf
    r, c = np.nonzero(sims > job.edge_threshold)
    es, ed, ew = top_k_edges(s_gid[r], gids[c], sims[r, c], job.edge_k)
    found = read_parquet(job.work("found", part_name(index)))
    mine = np.isin(found["src"].to_numpy(), s_gid)
    fs, fd = found["src"].to_numpy()[mine], found["dst"].to_numpy()[mine]
    table = pa.table({
        "kind": pa.array(np.r_[np.zeros(len(es), np.int8), np.ones(len(fs), np.int8)], pa.int8()),
        "src": pa.array(np.r_[es, fs], pa.int64()), "dst": pa.array(np.r_[ed, fd], pa.int64()),
        "score": pa.array(np.r_[ew, np.zeros(len(fs), np.float32)].astype(np.float32), pa.float32()),
    }, schema=RECALL)  # fmt: skip
    write_parquet(job.work("recall", part_name(index)), table)
    stats = {"part": index, "in": len(x), "out": table.num_rows, "seconds": round(time.perf_counter() - t0, 3)}
    job.store.mark_done("recall", index, stats, job.config_hash)
    return stats


def edge_recall(job: GraphJob, n_sample: int, index: int) -> dict[str, Any]:
    """Recall of the found edges against the exact top-k edges of the sampled vectors (kept in the marker)."""
    from curation.index.blockjoin import top_k_edges

    t = pa.concat_tables([read_parquet(job.work("recall", part_name(b))) for b in range(len(job.blocks))])
    kind, src, dst, score = (t[c].to_numpy() for c in ("kind", "src", "dst", "score"))
    es, ed, _ = top_k_edges(src[kind == 0], dst[kind == 0], score[kind == 0], job.edge_k)
    exact = set(zip(es.tolist(), ed.tolist()))
    found = set(zip(src[kind == 1].tolist(), dst[kind == 1].tolist()))
    stats = {"part": index, "in": n_sample, "out": len(exact),
             "edge_recall": round(len(exact & found) / len(exact), 6) if exact else 1.0,
             "recall_exact_edges": len(exact)}  # fmt: skip
    job.store.mark_done("recall-merge", index, stats, job.config_hash)
    return stats


def _labels(url: str, gids: np.ndarray, offset: int) -> np.ndarray:
    """Component label of every gid (its own id when it has no edge) from a labels file of node ids."""
    out = gids + offset
    if exists(url) and len(gids):
        t = read_parquet(url, schema=LABELS)
        node, label = t["node"].to_numpy(), t["label"].to_numpy()
        mine = (node >= out[0]) & (node <= out[-1])  # bucket 0 of the decontamination graph holds references too
        out = out.copy()
        out[node[mine] - out[0]] = label[mine]
    return out


def keep_part(job: GraphJob, manifest_urls: list[str], dup: ComponentGraph, dec: ComponentGraph | None,
              index: int) -> dict[str, Any]:  # fmt: skip
    """Best member (priority, then smallest gid) and contamination of every component within block ``index``,
    one row per component, sent to the bucket of the component (see the module docstring)."""
    t0 = time.perf_counter()
    p0, p1 = job.blocks[index]
    gids = np.arange(job.part_starts[p0], job.part_starts[p1], dtype=np.int64)
    label = _labels(dup.label_url(index), gids, 0)
    hit = np.zeros(len(gids), bool)
    if dec is not None:
        hit = _labels(dec.label_url(index), gids, job.ref_count) < job.ref_count
    area: dict[str, float] = {}
    uids: list[str] = []
    for p in range(p0, p1):
        m = read_parquet(manifest_urls[p], columns=["uid", "width", "height"])
        area.update(zip(m["uid"].to_pylist(), (np.asarray(m["width"].to_numpy(zero_copy_only=False), np.float64)
                                               * np.asarray(m["height"].to_numpy(zero_copy_only=False)))))
        uids += read_parquet(job.part_urls[p], columns=["uid"])["uid"].to_pylist()
    priority = np.array([area.get(u, 0.0) for u in uids], np.float64)
    lab, pri, gid, any_hit = _best_per_label(label, priority, gids, hit)
    table = pa.table({"label": lab, "block": np.full(len(lab), index, np.int64), "priority": pri, "gid": gid,
                      "hit": any_hit}, schema=KEEP)  # fmt: skip
    write_buckets(job.work("keep", part_name(index)), table, bucket_of_ranges(lab, job.block_starts),
                  len(job.blocks))
    stats = {"part": index, "in": len(gids), "out": len(lab), "hit": int(hit.sum()),
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("keep", index, stats, job.config_hash)
    return stats


def _best_per_label(label: np.ndarray, priority: np.ndarray, gid: np.ndarray, hit: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per distinct label: the highest priority, its smallest gid, and whether any row is hit."""
    if not len(label):
        return label, priority, gid, hit
    order = np.lexsort((gid, -priority, label))
    lab = label[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    any_hit = np.maximum.reduceat(hit[order].astype(np.int8), starts).astype(bool)
    top = order[starts]
    return label[top], priority[top], gid[top], any_hit


def resolve_part(job: GraphJob, index: int) -> dict[str, Any]:
    """The kept member and the contamination of every component of bucket ``index``, sent back to every block
    that holds members of it."""
    t0 = time.perf_counter()
    t = read_bucket([job.work("keep", part_name(b)) for b in range(len(job.blocks))], index, KEEP)
    label, block = t["label"].to_numpy(), t["block"].to_numpy()
    hit = t["hit"].to_numpy(zero_copy_only=False).astype(bool)
    lab, _, winner, any_hit = _best_per_label(label, t["priority"].to_numpy(), t["gid"].to_numpy(), hit)
    pos = np.searchsorted(lab, label)
    table = pa.table({"label": label, "winner": winner[pos], "hit": any_hit[pos]}, schema=RESOLVED)
    write_buckets(job.work("resolve", part_name(index)), table, block, len(job.blocks))
    stats = {"part": index, "in": t.num_rows, "out": len(lab), "seconds": round(time.perf_counter() - t0, 3)}
    job.store.mark_done("resolve", index, stats, job.config_hash)
    return stats


def write_part(job: GraphJob, index: int) -> dict[str, Any]:
    """Write ``dedup/part-p`` for every embeddings part ``p`` of block ``index``."""
    t0 = time.perf_counter()
    cfg = job.cfg
    p0, p1 = job.blocks[index]
    s0, s1 = job.part_starts[p0], job.part_starts[p1]
    gid = np.arange(s0, s1, dtype=np.int64)
    label = _labels(job.work("cc-dup", "labels", part_name(index)), gid, 0)
    t = read_bucket([job.work("resolve", part_name(b)) for b in range(len(job.blocks))], index, RESOLVED)
    t = t.sort_by("label")
    lab = t["label"].to_numpy()
    pos = np.searchsorted(lab, label)
    assert len(gid) == 0 or np.array_equal(lab[pos], label), "a component lost its resolution"  # internal invariant
    keep = t["winner"].to_numpy()[pos] == gid if len(gid) else np.zeros(0, bool)
    contaminated = t["hit"].to_numpy(zero_copy_only=False).astype(bool)[pos] if len(gid) else np.zeros(0, bool)
    best = read_parquet(job.work("best", part_name(index)), schema=BEST)
    score = best["best"].to_numpy()
    partner_uid = best["partner_uid"].to_pylist()
    if job.verify:  # nearest = the best-scoring verified copy
        from curation.stages.verify_steps import verified_partner

        _, verified = verified_partner(job, index)
    else:
        verified = [u if s > cfg.threshold else None for u, s in zip(partner_uid, score)]
    for p in range(p0, p1):
        a, b = job.part_starts[p] - s0, job.part_starts[p + 1] - s0
        uids = read_parquet(job.part_urls[p], columns=["uid"])["uid"].to_pylist()
        nearest = verified[a:b]
        table = pa.table({
            "uid": pa.array(uids, pa.string()),
            "component": pa.array(label[a:b], pa.int64()),
            "keep": pa.array(keep[a:b] & ~contaminated[a:b], pa.bool_()),
            "nearest_uid": pa.array(nearest, pa.string()),
            "score": pa.array(score[a:b], pa.float32()),
            "contaminated": pa.array(contaminated[a:b], pa.bool_()),
        }, schema=schemas.DEDUP)  # fmt: skip
        write_parquet(job.store.data_url("dedup", p), table)
    stats = {"part": index, "in": int(s1 - s0), "out": int((keep & ~contaminated).sum()),
             "duplicates": int((~keep & ~contaminated).sum()), "contaminated": int(contaminated.sum()),
             "components": int((label == gid).sum()), "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("write", index, stats, job.config_hash)
    return stats
