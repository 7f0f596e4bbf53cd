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

    python bench/curation_scale.py                              # the issue's sizes (long: 1e6 runs)
    python bench/curation_scale.py --dedup-sizes 1e4,1e5 --kmeans-sizes 1e5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def _run_child(task: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", task, "--n", str(n)]
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
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = {"dedup": child_dedup, "kmeans": child_kmeans, "hkmeans": child_hkmeans}[args.child]
        print(json.dumps(fn(args)))
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


if __name__ == "__main__":
    main()
