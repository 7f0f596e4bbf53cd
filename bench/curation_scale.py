"""Scale benchmark of the curation numerics (``curation.index``) on synthetic clustered embeddings.

* dedupe: ``copy_detect`` = k-NN graph (k=64; exact below 50k vectors, IVF above; BLAS similarity join on
  CPU) + threshold 0.6 + union-find, at 1e4, 1e5, 1e6 x 384. Reports wall and CPU time, peak RSS, precision /
  recall of the duplicate pairs against the planted copies, and the recall of the thresholded k-NN edges
  against an exact search for a sample of queries.
* kmeans: flat spherical k-means (1e4 centroids) + assignment of every vector, at 1e5 and 1e6 x 384.
* hkmeans: hierarchical k-means with resampling (levels ``--levels``) + balanced sampling to n/10.

Every (task, size, repeat) runs in a fresh subprocess so the peak RSS is that of the measured work alone
(data generation included; the RSS after generation is reported separately). Times are medians over
``--repeats`` runs (sizes above ``--repeat-max`` run once). The machine may be shared: load averages are
printed with the table.

``--distributed``: the dedupe *stage* on a local multi-node Ray cluster (:class:`curation.ray.local_cluster.
LocalRayCluster`: head + ``--workers`` nodes on 127.0.0.1) against in-process ``copy_detect`` on the same
vectors. For each of ``--sizes`` a synthetic run directory is written chunk by chunk (``clustered()`` per chunk of
``--parts-per-chunk`` parts, planted copies within a chunk, spread over its parts): ``manifest/`` and
``embeddings/`` parts (float16, ``--rows-per-part`` rows) with the ingest and embed success records the stage
checks. Then ``python -m curation stage dedupe default`` is submitted as a Ray job (a fresh cluster per size).
Reported: job wall time, the driver's and the largest worker's peak RSS (the stage record's
``worker_peak_rss_mb`` and VmHWM sampled from /proc), the stage's ``edge_recall`` and the pair precision /
recall of the planted copies from ``dedup/part-*``; last, one JSON line per size.

    python bench/curation_scale.py                              # the issue's sizes (long: 1e6 runs)
    python bench/curation_scale.py --dedup-sizes 1e4,1e5 --kmeans-sizes 1e5
    python bench/curation_scale.py --distributed --sizes 2e4    # multi-node dedupe stage vs in-process
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

if TYPE_CHECKING:
    from curation.config import RunConfig

log = logging.getLogger("curation_scale")


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered(n: int, d: int, seed: int, dup_frac: float = 0.1, spread: float = 1.5,
              copy_noise: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around n/1000 random centres (cos within a cluster ~0.3) plus planted near-copies.

    A ``dup_frac`` share of the rows are noisy copies (cos ~0.93) of originals, ~2 copies per copied original.
    Returns (x float32 (n, d), group int64 (n,)): rows with the same group are copies of each other.
    """
    rng = np.random.default_rng(seed)
    n_copies = int(n * dup_frac)
    n_orig = n - n_copies
    centers = _unit(rng.standard_normal((max(16, n // 1000), d)).astype(np.float32))
    x = np.empty((n, d), dtype=np.float32)
    chunk = 65_536
    for s in range(0, n_orig, chunk):
        e = min(n_orig, s + chunk)
        noise = rng.standard_normal((e - s, d), dtype=np.float32) * np.float32(spread / np.sqrt(d))
        x[s:e] = _unit(centers[rng.integers(0, len(centers), e - s)] + noise)
    sources = rng.choice(n_orig, size=max(1, n_copies // 2), replace=False)
    src_of_copy = sources[rng.integers(0, len(sources), n_copies)]
    for s in range(0, n_copies, chunk):
        e = min(n_copies, s + chunk)
        noise = rng.standard_normal((e - s, d), dtype=np.float32) * np.float32(copy_noise / np.sqrt(d))
        x[n_orig + s:n_orig + e] = _unit(x[src_of_copy[s:e]] + noise)
    group = np.concatenate([np.arange(n_orig), src_of_copy]).astype(np.int64)
    perm = rng.permutation(n)
    return x[perm], group[perm]


def pair_precision_recall(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Precision / recall of 'same component' pairs of ``pred`` against ``truth`` (pair counting)."""
    def pairs(counts: np.ndarray) -> float:
        return float(np.sum(counts.astype(np.float64) * (counts - 1) / 2))

    both = pairs(np.unique(pred * (int(truth.max()) + 1) + truth, return_counts=True)[1])
    p = pairs(np.unique(pred, return_counts=True)[1])
    t = pairs(np.unique(truth, return_counts=True)[1])
    return (both / p if p else 1.0), (both / t if t else 1.0)


def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child_dedup(args: argparse.Namespace) -> dict:
    from curation.index import IndexConfig, copy_detect
    from curation.index.search import FaissIndex

    if args.synthetic_run:  # the vectors of a synthetic run (float16 as stored), for --distributed
        x, group = read_synthetic_vectors(args.synthetic_run)
    else:
        x, group = clustered(args.n, args.dim, seed=args.seed)
    rss_data = _rss_now_mb()
    cfg = IndexConfig(nprobe=args.nprobe, exact_max=args.exact_max, self_join=args.self_join)
    c0, t0 = _cpu_s(), time.perf_counter()
    res = copy_detect(x, k=args.k, threshold=args.threshold, index=cfg)
    t1, c1 = time.perf_counter(), _cpu_s()
    peak = _peak_mb()
    precision, recall = pair_precision_recall(res.component, group)
    plan = "exact" if args.n <= args.exact_max else f"IVF nprobe={args.nprobe}"
    out = {"task": "dedup", "n": args.n, "index": f"{plan} graph={args.self_join}", "seconds": t1 - t0,
           "cpu_s": c1 - c0, **{f"{k}_s": v for k, v in res.timings.items()}, "peak_rss_mb": peak,
           "rss_data_mb": rss_data, "edges": res.n_edges, "kept": int(res.keep.sum()),
           "pair_precision": precision, "pair_recall": recall}
    if args.n > args.exact_max and args.recall_sample > 0:  # thresholded-edge recall vs exact on a query sample
        rng = np.random.default_rng(args.seed + 1)
        q = np.sort(rng.choice(len(x), size=min(args.recall_sample, len(x)), replace=False))
        es, ei = FaissIndex(x, IndexConfig(kind="flat")).search(x[q], args.k + 1)
        exact = {(int(a), int(b)) for a, row_s, row_i in zip(q, es, ei)
                 for s, b in list(zip(row_s, row_i))[:args.k + 1] if b != a and s > args.threshold}
        in_q = np.isin(res.edge_src, q)
        approx = set(zip(res.edge_src[in_q].tolist(), res.edge_dst[in_q].tolist()))
        out["edge_recall"] = len(exact & approx) / max(1, len(exact))
        out["sample_edges"] = len(exact)
    return out


def synthetic_chunks(n: int, d: int, seed: int, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``clustered()`` chunk by chunk: ``(x float32 (m, d), group int64 (m,))`` per chunk of ``chunk_rows`` rows
    (the last may be shorter); chunk ``c`` has its own seed and centres, its groups are offset by its first row,
    so copies are planted within a chunk. Only one chunk is in memory at a time."""
    for c, start in enumerate(range(0, n, chunk_rows)):
        m = min(chunk_rows, n - start)
        x, group = clustered(m, d, seed=seed * 1_000_003 + c)
        yield x, group + start


def synthetic_uid(gid: int, part: int, row: int, n_parts: int) -> str:
    """40-hex uid of row ``gid``: the first 8 hex digits fall in manifest bucket ``part`` (as ingest buckets
    uids), rising with ``row``; the rest is the sha1 of the row id."""
    from curation.stages.ingest import uid_range

    lo = int(uid_range(part, n_parts)[0], 16)
    return format(lo + row, "08x") + hashlib.sha1(str(gid).encode()).hexdigest()[8:]


def write_synthetic_run(run_dir: str, config: RunConfig, n: int, dim: int = 384, seed: int = 0,
                        rows_per_part: int = 4096, parts_per_chunk: int = 16) -> np.ndarray:
    """Write a run directory as ingest + embed would leave it for ``n`` synthetic vectors with planted copies:
    ``manifest/part-N`` (width x height = a random area, the keep priority) and ``embeddings/part-N`` (float16,
    same rows), their ``_SUCCESS.json`` records under ``config``'s config hashes, and ``synthetic_truth.npy``
    (the planted group of every row, in part order). Returns the groups. Holds one chunk of
    ``rows_per_part x parts_per_chunk`` rows at a time."""
    import pyarrow as pa

    from curation import schemas
    from curation.io.artifacts import EMBEDDINGS_DIR, MANIFEST_DIR
    from curation.io.fs import write_parquet
    from curation.io.parts import code_version
    from curation.stages.embed import EmbedStage
    from curation.stages.ingest import IngestStage

    n_parts = max(1, math.ceil(n / rows_per_part))
    if rows_per_part > (1 << 32) // n_parts:
        raise ValueError(f"{rows_per_part} rows per part do not fit the uid buckets of {n_parts} parts")
    ingest, embed = IngestStage(config, run_dir), EmbedStage(config, run_dir)
    rng = np.random.default_rng(seed + 7)
    groups = []
    part = 0
    for x, group in synthetic_chunks(n, dim, seed, rows_per_part * parts_per_chunk):
        groups.append(group)
        for s in range(0, len(x), rows_per_part):
            e = min(len(x), s + rows_per_part)
            gid0 = part * rows_per_part
            uids = [synthetic_uid(gid0 + r, part, r, n_parts) for r in range(e - s)]
            uris = [f"synthetic://{gid0 + r}" for r in range(e - s)]
            m = e - s
            manifest = pa.table({
                "uid": uids, "uris": [[u] for u in uris], "uri": uris, "container": pa.nulls(m, pa.string()),
                "offset": np.full(m, -1, np.int64), "size": np.zeros(m, np.int64),
                "width": rng.integers(64, 1025, m, dtype=np.int32), "height": rng.integers(64, 1025, m, dtype=np.int32),
                "format": ["JPEG"] * m, "mode": ["RGB"] * m, "n_frames": np.ones(m, np.int32),
            }, schema=schemas.MANIFEST)  # fmt: skip
            write_parquet(ingest.store.data_url(MANIFEST_DIR, part), manifest)
            values = pa.array(x[s:e].astype(np.float16).reshape(-1), pa.float16())
            emb = pa.Table.from_arrays([pa.array(uids, pa.string()), pa.FixedSizeListArray.from_arrays(values, dim)],
                                       schema=schemas.embeddings(dim, "float16"))  # fmt: skip
            write_parquet(embed.store.data_url(EMBEDDINGS_DIR, part), emb)
            part += 1
    common = {"prefix": "", "code_version": code_version(), "seconds": 0.0, "parts_computed": 0,
              "in": n, "out": n, "rejected": {}, "synthetic": True}  # fmt: skip
    ingest.store.write_success({"stage": "ingest", "config_hash": ingest.config_hash, **common, "parts": n_parts,
                                "duplicates": 0, "rows": {"manifest": n, "rejects": 0, "occurrences": n},
                                "manifest_parts": n_parts, "scan_parts": 0})  # fmt: skip
    embed.store.write_success({"stage": "embed", "config_hash": embed.config_hash, **common, "parts": n_parts,
                               "rows": {"embeddings": n}, "dim": dim, "embedding_parts": n_parts,
                               "actors": 0})  # fmt: skip
    truth = np.concatenate(groups)
    with open(os.path.join(run_dir, "synthetic_truth.npy"), "wb") as f:
        np.save(f, truth)
    return truth


def _parts(run_dir: str, subdir: str, columns: list[str]) -> Iterator:
    """The ``columns`` of every ``subdir/part-N`` of a synthetic run, in part order."""
    import pyarrow.parquet as pq

    with open(os.path.join(run_dir, "embeddings", "_SUCCESS.json")) as f:
        n_parts = int(json.load(f)["embedding_parts"])
    for i in range(n_parts):
        yield pq.read_table(os.path.join(run_dir, subdir, f"part-{i:05d}.parquet"), columns=columns)


def read_synthetic_vectors(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """All embeddings of a synthetic run as float32 (rounded through float16 as stored) and the planted groups."""
    truth = np.load(os.path.join(run_dir, "synthetic_truth.npy"))
    mats = []
    for t in _parts(run_dir, "embeddings", ["emb"]):
        flat = t["emb"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        mats.append(np.asarray(flat, np.float32).reshape(t.num_rows, -1))
    x = np.concatenate(mats)
    assert len(x) == len(truth), f"{len(x)} vectors but {len(truth)} planted groups in {run_dir}"
    return x, truth


def dedup_precision_recall(run_dir: str) -> tuple[float, float]:
    """Pair precision / recall of the ``component`` column of ``dedup/part-*`` against the planted copies (rows
    with the same component are one predicted group)."""
    truth = np.load(os.path.join(run_dir, "synthetic_truth.npy"))
    comps = []
    for emb, dedup in zip(_parts(run_dir, "embeddings", ["uid"]), _parts(run_dir, "dedup", ["uid", "component"])):
        if not emb["uid"].equals(dedup["uid"]):
            raise ValueError(f"dedup parts of {run_dir} are not aligned with its embeddings parts")
        comps.append(dedup["component"].to_numpy())
    component = np.concatenate(comps)
    assert len(component) == len(truth)
    return pair_precision_recall(component, truth)


def _distributed_overrides(args: argparse.Namespace) -> list[str]:
    """Recipe overrides of the distributed dedupe run (the generator must hash the same config as the job)."""
    from dataclasses import fields

    from curation.config import DedupeConfig

    out = [f"dedupe.k={args.k}", f"dedupe.threshold={args.threshold}", f"dedupe.index.exact_max={args.exact_max}"]
    if "verify" in {f.name for f in fields(DedupeConfig)}:
        out.append("dedupe.verify=false")  # synthetic vectors have no images to verify
    return out + list(args.dedupe_set)


def run_distributed(n: int, args: argparse.Namespace) -> dict:
    """One size of ``--distributed``: synthetic run, in-process ``copy_detect`` on its vectors, then the dedupe
    stage as a Ray job on a fresh local multi-node cluster. Returns the figures of the size."""
    from curation.cli import load_run_config
    from curation.io.fs import read_json
    from curation.ray.local_cluster import LocalRayCluster

    overrides = _distributed_overrides(args)
    config = load_run_config("default", overrides)
    run = tempfile.mkdtemp(prefix=f"dedupe-{n}-", dir=args.work_dir)
    try:
        t0 = time.perf_counter()
        write_synthetic_run(run, config, n, args.dim, args.seed, args.rows_per_part, args.parts_per_chunk)
        n_parts = max(1, math.ceil(n / args.rows_per_part))
        print(f"distributed n={n:,d}: synthetic run with {n_parts} parts written in {time.perf_counter() - t0:.1f} s "
              f"({run})", flush=True)
        inproc = None
        if not args.no_inproc:
            inproc = _run_child("dedup", n, args, synthetic_run=run)
            print(f"  in-process copy_detect: {inproc['seconds']:.1f} s (cpu {inproc['cpu_s']:.1f} s), peak "
                  f"{inproc['peak_rss_mb']:.0f} MB, precision {inproc['pair_precision']:.4f} recall "
                  f"{inproc['pair_recall']:.4f} [{inproc['index']}]", flush=True)
        job = ["stage", "dedupe", "default", "--out", run] + [a for o in overrides for a in ("--set", o)]
        with LocalRayCluster(workers=args.workers, cpus_per_node=args.cpus_per_node,
                             memory_bytes=int(args.node_memory_gb * 1024**3),
                             object_store_bytes=args.object_store_mb * 1024**2, temp_root=args.work_dir) as cluster:
            t1 = time.perf_counter()
            proc = cluster.submit(job, timeout=args.job_timeout)
            wall = time.perf_counter() - t1
            procs = cluster.process_peak_rss_mb()
        if proc.returncode != 0:
            raise SystemExit(f"dedupe job n={n} failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
                             f"{proc.stderr[-4000:]}")  # fmt: skip
        rec = read_json(os.path.join(run, "dedup", "_SUCCESS.json"))
        precision, recall = dedup_precision_recall(run)
        worker = max(v for v in (rec.get("worker_peak_rss_mb"), procs.get("worker")) if v is not None)
        out = {"n": n, "driver_peak_rss_mb": rec["driver_peak_rss_mb"], "worker_peak_rss_mb": round(worker, 1),
               "wall_s": round(wall, 2), "edge_recall": rec.get("edge_recall"), "precision": round(precision, 6),
               "recall": round(recall, 6)}  # fmt: skip
        if inproc is not None:
            out["inproc_wall_s"] = round(inproc["seconds"], 2)
        print(f"  Ray job ({args.workers} worker nodes x {args.cpus_per_node} CPU): wall {wall:.1f} s (stage "
              f"{rec['seconds']:.1f} s, plan {rec.get('plan')}, {rec.get('parts_computed')} parts on "
              f"{rec.get('nodes')} nodes), driver peak {rec['driver_peak_rss_mb']:.0f} MB, worker peak "
              f"{worker:.0f} MB (record {rec.get('worker_peak_rss_mb')}, /proc {procs}), edge_recall "
              f"{rec.get('edge_recall')}, precision {precision:.4f} recall {recall:.4f}", flush=True)
        return out
    finally:
        if not args.keep_runs:
            shutil.rmtree(run, ignore_errors=True)


def _levels(spec: str, args: argparse.Namespace):
    from curation.index import LevelConfig

    out = []
    for part in spec.split(","):
        k, steps, r = (int(v) for v in part.split(":"))
        out.append(LevelConfig(n_clusters=k, n_resampling_steps=steps, sample_size=r, niter=args.kmeans_niter,
                               max_points_per_centroid=args.kmeans_mppc))
    return out


def child_kmeans(args: argparse.Namespace) -> dict:
    from curation.index import assign, spherical_kmeans

    x, _ = clustered(args.n, args.dim, seed=args.seed, dup_frac=0.0)
    rss_data = _rss_now_mb()
    c0, t0 = _cpu_s(), time.perf_counter()
    cent = spherical_kmeans(x, args.kmeans_k, niter=args.kmeans_niter, seed=args.seed,
                            max_points_per_centroid=args.kmeans_mppc)
    t1 = time.perf_counter()
    labels, _ = assign(x, cent)
    t2, c2 = time.perf_counter(), _cpu_s()
    return {"task": "kmeans", "n": args.n, "index": f"k={args.kmeans_k} niter={args.kmeans_niter} "
            f"train={min(args.n, args.kmeans_mppc * args.kmeans_k)}", "seconds": t2 - t0, "cpu_s": c2 - c0,
            "train_s": t1 - t0,
            "assign_s": t2 - t1, "peak_rss_mb": _peak_mb(), "rss_data_mb": rss_data,
            "nonempty": int(len(np.unique(labels)))}


def child_hkmeans(args: argparse.Namespace) -> dict:
    from curation.index import balanced_sample, hierarchical_kmeans

    x, _ = clustered(args.n, args.dim, seed=args.seed, dup_frac=0.0)
    rss_data = _rss_now_mb()
    c0, t0 = _cpu_s(), time.perf_counter()
    levels = hierarchical_kmeans(x, _levels(args.levels, args), seed=args.seed)
    t1 = time.perf_counter()
    sel = balanced_sample([lvl.assignment for lvl in levels], args.n // 10, seed=args.seed)
    t2, c2 = time.perf_counter(), _cpu_s()
    top = levels[0].assignment
    for lvl in levels[1:]:
        top = lvl.assignment[top]  # top-level cluster of every vector
    before = np.bincount(top, minlength=len(levels[-1].centroids))
    after = np.bincount(top[sel], minlength=len(levels[-1].centroids))
    nonempty = before > 0
    return {"task": "hkmeans", "n": args.n, "index": args.levels, "seconds": t2 - t0, "cpu_s": c2 - c0,
            "hkmeans_s": t1 - t0, "sample_s": t2 - t1, "peak_rss_mb": _peak_mb(), "rss_data_mb": rss_data,
            "selected": int(len(sel)), "top_max_min_pool": float(before.max() / before[nonempty].min()),
            "top_max_min_selected": float(after.max() / max(1, after[nonempty].min()))}


def _sizes(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def _run_child(task: str, n: int, args: argparse.Namespace, synthetic_run: str = "") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", task, "--n", str(n)]
    if synthetic_run:
        cmd += ["--synthetic-run", synthetic_run]
    for name in ("dim", "k", "threshold", "nprobe", "exact_max", "self_join", "recall_sample", "kmeans_k",
                 "kmeans_niter", "kmeans_mppc", "levels", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {task} n={n} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dedup-sizes", default="1e4,1e5,1e6", help="comma list ('' to skip)")
    p.add_argument("--kmeans-sizes", default="1e5,1e6", help="comma list for kmeans and hkmeans ('' to skip)")
    p.add_argument("--tasks", default="dedup,kmeans,hkmeans")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=64, help="neighbours per vector in the dedup kNN graph")
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--exact-max", type=int, default=50_000)
    p.add_argument("--self-join", default="auto", help="dedup graph: auto|blas|faiss (IndexConfig.self_join)")
    p.add_argument("--recall-sample", type=int, default=10_000, help="queries for the edge recall vs exact")
    p.add_argument("--kmeans-k", type=int, default=10_000)
    p.add_argument("--kmeans-niter", type=int, default=10)
    p.add_argument("--kmeans-mppc", type=int, default=32, help="max points per centroid (training sample)")
    p.add_argument("--levels", default="10000:1:1,1000:3:5,100:3:3", help="n_clusters:resampling_steps:sample")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repeat-max", type=float, default=1e5, help="sizes above this run once")
    p.add_argument("--kmeans-repeats", type=int, default=1, help="repeats for kmeans/hkmeans (expensive)")
    p.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("--distributed: the dedupe stage as a Ray job on a local multi-node cluster")
    d.add_argument("--distributed", action="store_true", help="run this mode instead of the in-process tasks")
    d.add_argument("--sizes", default="1e5,1e6", help="comma list of pool sizes")
    d.add_argument("--rows-per-part", type=int, default=4096, help="rows per manifest / embeddings part")
    d.add_argument("--parts-per-chunk", type=int, default=16, help="parts generated together (copies within)")
    d.add_argument("--workers", type=int, default=2, help="worker nodes (the head gets no CPUs)")
    d.add_argument("--cpus-per-node", type=int, default=1)
    d.add_argument("--node-memory-gb", type=float, default=4.0, help="Ray --memory of every node")
    d.add_argument("--object-store-mb", type=int, default=200, help="Ray --object-store-memory of every node")
    d.add_argument("--dedupe-set", action="append", default=[], metavar="A.B=VALUE",
                   help="extra recipe override for the job, e.g. dedupe.block_rows=16384 (repeatable)")
    d.add_argument("--work-dir", default=None, help="where runs and Ray temp dirs go (default /tmp; not the repo, "
                   "which is uploaded as the job's working dir)")
    d.add_argument("--keep-runs", action="store_true", help="keep the synthetic run directories")
    d.add_argument("--no-inproc", action="store_true", help="skip the in-process copy_detect comparison")
    d.add_argument("--job-timeout", type=float, default=6 * 3600)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--synthetic-run", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = {"dedup": child_dedup, "kmeans": child_kmeans, "hkmeans": child_hkmeans}[args.child]
        print(json.dumps(fn(args)))
        return
    if args.distributed:
        main_distributed(args)
        return
    tasks = [t for t in args.tasks.split(",") if t]
    jobs = [("dedup", n) for n in _sizes(args.dedup_sizes) if "dedup" in tasks]
    jobs += [(t, n) for n in _sizes(args.kmeans_sizes) for t in ("kmeans", "hkmeans") if t in tasks]
    print(f"# curation_scale: {os.cpu_count()} CPUs, d={args.dim}, load average at start {os.getloadavg()} "
          "(shared machine: other jobs inflate times)", flush=True)
    rows = []
    for task, n in jobs:
        reps = (args.repeats if task == "dedup" else args.kmeans_repeats) if n <= args.repeat_max else 1
        runs = [_run_child(task, n, args) for _ in range(reps)]
        row = dict(runs[0])
        row["seconds"] = statistics.median(r["seconds"] for r in runs)
        row["cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        row["runs"] = reps
        rows.append(row)
        extra = {k: v for k, v in row.items()
                 if k not in ("task", "n", "index", "seconds", "cpu_s", "peak_rss_mb", "runs")}
        print(f"{task:8s} n={n:>9,d} {row['seconds']:9.1f} s (cpu {row['cpu_s']:.1f} s)  "
              f"peak {row['peak_rss_mb']:8.0f} MB  "
              f"[{row['index']}] runs={reps} " + " ".join(f"{k}={_fmt(v)}" for k, v in extra.items()), flush=True)
    print("\n| task | n | median wall s | median CPU s | wall s per 1e4 | peak RSS MB | runs | index / config |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['n']:,d} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | "
              f"{r['seconds'] / r['n'] * 1e4:.2f} | {r['peak_rss_mb']:.0f} | {r['runs']} | {r['index']} |")
    print(f"# load average at end {os.getloadavg()}")


def main_distributed(args: argparse.Namespace) -> None:
    """``--distributed``: every size, then one JSON line per size."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.work_dir = os.path.abspath(args.work_dir or tempfile.gettempdir())
    if os.path.commonpath([args.work_dir, REPO]) == REPO:
        raise SystemExit(f"--work-dir {args.work_dir} is inside the repository, which each job uploads")
    print(f"# curation_scale --distributed: {os.cpu_count()} CPUs, d={args.dim}, k={args.k}, threshold "
          f"{args.threshold}, load average at start {os.getloadavg()} (shared machine: other jobs inflate times)",
          flush=True)
    rows = [run_distributed(n, args) for n in _sizes(args.sizes)]
    print(f"# load average at end {os.getloadavg()}")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
