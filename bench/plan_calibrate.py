"""Measure the CPU figures of the cost plan's throughput table (``curation/plan/throughput.toml``).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \\
        .venv/bin/python bench/plan_calibrate.py [--sizes 558,279] [--repeats 2] [--models sscd,vitl14] [--write]

1. Real curation runs: the copy benchmark's real photos and edited copies (:mod:`curation.verify.bench_data`, the
   pool of ``bench/verify_cost.py``) written as files, the first N of them per size, each run with the user's
   command ``python -m curation run photos --out RUN --set ingest.sources=[POOL] ...`` (in-process Ray on every
   CPU; parts of 128 files / rows so every stage runs several tasks). Per-unit costs come from the parts' own
   ``seconds`` (markers under ``_work/``) and the stages' ``_SUCCESS.json`` (CPU-seconds per file, image,
   candidate pair, selected sample: the geometric mean over ``--repeats`` runs per size, since a shared machine's
   load changes from one minute to the next; worker peak RSS; bytes on disk per output row); each
   stage's fixed overhead is its measured wall minus what the plan's model gives for that run without it (the
   same geometric mean over the repeats, then the mean over the sizes).
2. Kernels on one thread: scored vector pairs of the dedupe join at two dimensions (seconds = a + b x dim per
   pair), faiss nearest-centroid search and spherical k-means per dot product, one row group read of a bucketed
   shuffle file, decode + resize of the pool's images, and the neural embedders' forward pass on CPU
   (random weights: SSCD is a ResNet-50 at 320 px, defined here; the DINOv2 backbones from ``pretrain.models``).
3. Ray: the latency of a step (one no-op task), the cost of one more task, and an embed actor's start.

Prints the measured sections as TOML; ``--write`` puts them between the BEGIN/END measured marks of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TABLE = ROOT / "curation" / "plan" / "throughput.toml"
#: Settings of the calibration runs: small parts (several tasks per stage) and cluster levels a small kept pool fits.
SETS = ["ingest.files_per_part=128", "ingest.rows_per_part=128",
        "cluster.levels=[{n_clusters = 16, n_resampling_steps = 2, sample_size = 2}, {n_clusters = 4}]"]  # fmt: skip
ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
OUTPUTS = {"ingest": "manifest", "embed": "embeddings", "dedupe": "dedup", "cluster": "clusters",
           "retrieve": "selection", "shard": "shards", "report": "report"}  # fmt: skip


def write_pool(path: Path, n: int | None = None) -> tuple[int, float]:
    """The copy benchmark (558 real photos and copies) as files under ``path`` (the first ``n``); count, mean bytes."""
    from curation.verify import bench_data

    path.mkdir(parents=True, exist_ok=True)
    images = bench_data.build(0, 8)[:n]
    for i, x in enumerate(images):
        ext = "png" if x.data[:4] == b"\x89PNG" else "jpg"
        (path / f"{i:05d}.{ext}").write_bytes(x.data)
    return len(images), float(np.mean([len(x.data) for x in images]))


def markers(run: Path, stage: str) -> dict[str, list[dict[str, Any]]]:
    """Part markers of ``stage`` by step."""
    out: dict[str, list[dict[str, Any]]] = {}
    for step in sorted((run / "_work" / stage).glob("*/")):
        parts = [json.loads(p.read_text()) for p in sorted(step.glob("part-*.json"))]
        if parts:
            out[step.name] = parts
    return out


def secs(steps: dict[str, list[dict[str, Any]]], *names: str, prefix: str = "") -> float:
    return sum(float(p.get("seconds", 0)) for s, ps in steps.items() if s in names or (prefix and s.startswith(prefix))
               for p in ps)  # fmt: skip


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def curation_run(pool: Path, run: Path) -> dict[str, Any]:
    """One ``python -m curation run photos`` into ``run``; the records, markers and wall."""
    cmd = [sys.executable, "-m", "curation", "run", "photos", "--out", str(run), "--set", f'ingest.sources=["{pool}"]']
    for s in SETS:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ENV}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    wall = time.perf_counter() - t0
    recs = {s: json.loads((run / d / "_SUCCESS.json").read_text()) for s, d in OUTPUTS.items()}
    return {"run": run, "wall": wall, "recs": recs, "steps": {s: markers(run, s) for s in OUTPUTS}}


def cached_run(run: Path) -> dict[str, Any]:
    recs = {s: json.loads((run / d / "_SUCCESS.json").read_text()) for s, d in OUTPUTS.items()}
    return {"run": run, "wall": float("nan"), "recs": recs, "steps": {s: markers(run, s) for s in OUTPUTS}}


def run_figures(r: dict[str, Any], image_bytes: float) -> dict[str, dict[str, float]]:
    """Per-unit figures of one run."""
    rec, st, run = r["recs"], r["steps"], r["run"]
    n_files, n = rec["ingest"]["in"], rec["ingest"]["out"]
    ded, kept, sel = rec["dedupe"], rec["dedupe"]["out"], rec["shard"]["in"]
    other = secs(st["dedupe"], "reduce", "locate", "keep", "resolve", "write", prefix="cc-")
    shard_plan = secs(st["shard"], "select", "lineage", "join", "plan")
    emb_bytes = n * rec["embed"]["dim"] * 2
    return {
        "ingest": {"scan_s_per_file": secs(st["ingest"], "scan") / n_files,
                   "collapse_s_per_row": secs(st["ingest"], "collapse") / n_files},
        "embed.cpu": {"descriptor": secs(st["embed"], "embed") / n},
        "dedupe": {"features_s_per_image": ded["features_seconds"] / max(1, ded["verified_images"]),
                   "verify_s_per_candidate": ded["verify_seconds"] / max(1, ded["candidates"]),
                   "other_s_per_image": other / n},
        "cluster": {"other_s_per_image": secs(st["cluster"], "assign", "sizes", "pick", "balanced",
                                              prefix="balance") / kept},
        "retrieve": {"select_s_per_row": secs(st["retrieve"], "select") / max(1, rec["retrieve"]["out"])},
        "shard": {"plan_s_per_row": shard_plan / n, "write_s_per_sample": secs(st["shard"], "shard") / max(1, sel)},
        "rss": {"ingest": rec["ingest"]["worker_peak_rss_mb"], "embed": rec["embed"]["worker_peak_rss_mb"],
                "dedupe": rec["dedupe"]["worker_peak_rss_mb"], "verify": rec["dedupe"]["worker_peak_rss_mb"],
                "cluster": rec["cluster"]["worker_peak_rss_mb"], "retrieve": rec["retrieve"]["worker_peak_rss_mb"],
                "shard": rec["shard"]["worker_peak_rss_mb"], "report": rec["report"]["driver_peak_rss_mb"]},
        "bytes": {"manifest": du(run / "manifest") / n, "occurrences": du(run / "occurrences") / n_files,
                  "embedding_value_ratio": du(run / "embeddings") / emb_bytes, "embedding_row": 0.0,
                  "dedup": du(run / "dedup") / n, "verify_pair": du(run / "verify") / max(1, ded["candidates"]),
                  "features": 0.0, "assign": du(run / "clusters" / "assign") / kept,
                  "selection": du(run / "selection") / max(1, rec["retrieve"]["out"]),
                  "shard_sample": max(0.0, du(run / "shards") / max(1, sel) - image_bytes),
                  "report": du(run / "report")},
        "funnel.bench": {"unique_fraction": n / n_files, "candidates_per_image": ded["candidates"] / n,
                         "features_fraction": ded["verified_images"] / n, "cc_rounds": ded["cc_rounds"],
                         "image_bytes": image_bytes},
    }  # fmt: skip


def pooled(per_run: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The runs' figures together: per-unit seconds the geometric mean over the runs (other jobs on a shared machine
    slow a run down by a factor), peak RSS the largest, bytes per row and the pool's properties from the first
    (largest) run."""
    out = {k: dict(v) for k, v in per_run[0].items()}
    for section in ("ingest", "embed.cpu", "dedupe", "cluster", "retrieve", "shard"):
        for key in out[section]:
            out[section][key] = float(np.exp(np.mean(np.log([max(r[section][key], 1e-12) for r in per_run]))))
    out["rss"] = {k: max(r["rss"][k] or 0.0 for r in per_run) for k in out["rss"]}
    return out


def kernels() -> dict[str, dict[str, float]]:
    """Join, search, k-means and shuffle-read costs on one thread."""
    import faiss

    from curation.index.blockjoin import join_blocks
    from curation.index.kmeans import spherical_kmeans
    from curation.stages.copygraph import one_blas_thread

    rng = np.random.default_rng(0)

    def unit(n: int, d: int) -> np.ndarray:
        x = rng.standard_normal((n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    per_pair = {}
    for d in (64, 2048):  # threshold above every random pair's score: the scan, not the edge bookkeeping
        x, n = unit(2048, d), 2048
        best = []
        for _ in range(3):
            with one_blas_thread():
                t0 = time.perf_counter()
                join_blocks(x, np.arange(n), k=32, threshold=0.9)
                best.append((time.perf_counter() - t0) / (n * n / 2))
        per_pair[d] = min(best)
    b = max(0.0, (per_pair[2048] - per_pair[64]) / (2048 - 64))
    a = max(0.0, per_pair[64] - 64 * b)
    faiss.omp_set_num_threads(1)
    q, c = unit(8192, 256), unit(4096, 256)
    index = faiss.IndexFlatIP(256)
    index.add(c)
    t0 = time.perf_counter()
    index.search(q, 4)
    search = (time.perf_counter() - t0) / (8192 * 4096 * 256)
    x = unit(20000, 256)
    t0 = time.perf_counter()
    spherical_kmeans(x, 256, niter=10, seed=0, max_points_per_centroid=1000, threads=1)
    kmeans = (time.perf_counter() - t0) / (20000 * 256 * 256 * 10)
    return {"dedupe": {"join_s_per_pair": a, "join_s_per_pair_dim": b, "search_s_per_dot": search,
                       "kmeans_s_per_dot": kmeans}, "io": {"read_s": shuffle_read_s()}}  # fmt: skip


def shuffle_read_s(maps: int = 64, buckets: int = 8) -> float:
    """Seconds to read one bucket's row group of one map file (``curation.io.buckets``), local disk."""
    import pyarrow as pa

    from curation.io.buckets import read_bucket, write_buckets

    with tempfile.TemporaryDirectory() as tmp:
        t = pa.table({"u": pa.array(np.arange(800), pa.int64()), "v": pa.array(np.arange(800), pa.int64())})
        urls = [f"{tmp}/m{i}.parquet" for i in range(maps)]
        for url in urls:
            write_buckets(url, t, np.arange(800) % buckets, buckets)
        t0 = time.perf_counter()
        for b in range(buckets):
            read_bucket(urls, b, t.schema)
        return (time.perf_counter() - t0) / (maps * buckets)


def _resnet50(dim: int = 512) -> Any:
    """A ResNet-50 trunk with GeM pooling and a linear projection: the shape of the SSCD descriptor (timing only)."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = width * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))  # fmt: skip
            self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.skip(x))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]  # fmt: skip
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.proj = nn.Sequential(*layers), nn.Linear(cin, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.trunk(x).clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
            return nn.functional.normalize(self.proj(f), dim=1)

    return Net().eval()


def embedders(pool: Path, models: list[str], device: str, batch: int = 2) -> dict[str, float]:
    """Per-image decode + resize seconds (224 px), and per-image forward seconds (``device``, one CPU thread)."""
    import torch
    from PIL import Image

    from curation.models.torch_embedder import ResizePreprocess

    torch.set_num_threads(1)
    files = sorted(pool.iterdir())[:64]
    pre = ResizePreprocess(224, "short_side_crop")
    t0 = time.perf_counter()
    for f in files:
        pre(Image.open(f).convert("RGB"))
    out = {"decode_s_per_image": (time.perf_counter() - t0) / len(files)}
    for name in models:
        if name == "sscd":
            model, size = _resnet50(), 320
        else:
            from pretrain.models import build_backbone

            model, size = build_backbone(name).eval(), 224
        model = model.to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        times = []
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            model(x)  # warm-up
            for _ in range(2):  # best of two: the forward pass's speed, not the neighbours' load
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        out[name] = min(times) / batch
        print(f"  {name}: {out[name]:.3g} s per image ({device})", flush=True)
        del model
    return out


def feature_bytes(pool: Path, n: int = 32) -> float:
    """Mean stored size of one image's verification features (``LocalFeatures.to_bytes``, default settings)."""
    from PIL import Image

    from curation.config import VerifyConfig
    from curation.verify.features import extract

    files = sorted(pool.iterdir())[:n]
    return float(np.mean([len(extract(Image.open(f).convert("RGB"), VerifyConfig()).to_bytes()) for f in files]))


def report_slope(runs: list[dict[str, Any]]) -> float:
    """CPU-seconds per image of the report stage: the slope of its wall between the sizes times the tasks that ran
    at once (its per-part reads are tasks over parts of 128 rows); 0 with one size."""
    if len(runs) < 2:
        return 0.0
    (n1, w1), (n2, w2) = ((r["recs"]["ingest"]["out"], r["recs"]["report"]["seconds"]) for r in runs[:2])
    return max(0.0, (w1 - w2) / (n1 - n2)) * min(os.cpu_count() or 1, -(-max(n1, n2) // 128))


def ray_overheads() -> dict[str, float]:
    """A step's latency (one no-op task), one more task's cost on every CPU, an embed actor's start."""
    from curation.config import EmbedConfig, RayConfig
    from curation.ray import executor_for

    with executor_for(RayConfig()) as ex:
        list(ex.map(_noop, [0], desc="warm"))
        t0 = time.perf_counter()
        for _ in range(5):
            list(ex.map(_noop, [0], desc="step"))
        step = (time.perf_counter() - t0) / 5
        n = 200
        t0 = time.perf_counter()
        list(ex.map(_noop, list(range(n)), desc="tasks"))
        task = max(0.0, (time.perf_counter() - t0 - step)) * ex.num_cpus / n
        t0 = time.perf_counter()
        list(ex.map_actors(lambda: _Embedder(EmbedConfig()), [0], desc="actor", concurrency=1))
        actor = max(0.0, time.perf_counter() - t0 - step)
    return {"step_s": step, "task_s": task, "actor_start_s": actor}


def _noop(i: int) -> dict[str, Any]:
    return {"part": i}


class _Embedder:
    """An embed actor's start: the descriptor built once (what ``EmbedWorker.__init__`` does for it)."""

    def __init__(self, cfg: Any) -> None:
        from curation.models import build_embedder

        self.embedder = build_embedder(cfg)

    def __call__(self, i: int) -> dict[str, Any]:
        return {"part": i}


def overheads(runs: list[dict[str, Any]], figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per stage: measured wall (geometric mean over the repeats of a size) minus the plan's model of that run with no
    stage overhead, mean over the sizes."""
    from curation.cli import load_run_config
    from curation.plan import Assumptions, estimate_plan, uniform_cluster
    from curation.plan.table import table_from_dict

    data: dict[str, Any] = {}
    for key, vals in {**figures, "overhead": dict.fromkeys(OUTPUTS, 0.0)}.items():
        node = data
        for part in key.split("."):
            node = node.setdefault(part, {})
        node.update(vals, command="calibration", machine="here")
    data["embed"]["gpu"] = {"command": "-", "machine": "-", "measured": False, "basis": "-"}
    table = table_from_dict(data)
    out: dict[str, list[float]] = {s: [] for s in OUTPUTS}
    by_size: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_size.setdefault(r["recs"]["ingest"]["in"], []).append(r)
    for size, same in by_size.items():  # the stage walls' geometric mean over the repeats, as the unit costs
        rec = same[0]["recs"]
        n = rec["ingest"]["out"]
        fb = run_figures(same[0], figures["funnel.bench"]["image_bytes"])["funnel.bench"]
        assume = Assumptions(**fb, keep_fraction=rec["dedupe"]["out"] / n)
        cfg = load_run_config("photos", [f'ingest.sources=["{same[0]["run"]}"]', *SETS])
        plan = estimate_plan(cfg, size, uniform_cluster(1, os.cpu_count() or 1), table, assume)
        for est in plan.stages:
            wall = float(np.exp(np.mean(np.log([max(float(r["recs"][est.name]["seconds"]), 1e-3) for r in same]))))
            out[est.name].append(wall - est.wall_s)
            print(f"  {size} images, {est.name}: measured {wall:.2f} s, modelled {est.wall_s:.2f} s without "
                  "overhead", flush=True)  # fmt: skip
    return {s: max(0.0, float(np.mean(v))) for s, v in out.items()}


def toml_text(figures: dict[str, dict[str, float]], command: str, machine: str) -> str:
    lines = []
    for section, vals in figures.items():
        lines += [f"[{section}]", f"command = {json.dumps(command)}", f"machine = {json.dumps(machine)}"]
        lines += [f"{k} = {float(v):.4g}" for k, v in vals.items()] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="558,279", help="pool sizes of the curation runs (first N images)")
    ap.add_argument("--models", default="sscd,vits14,vitb14,vitl14", help="neural embedders timed ('' = none)")
    ap.add_argument("--device", default="cpu", help="device of the embedder forward passes")
    ap.add_argument("--machine", default=f"{os.cpu_count()}-core VM, no GPU ({platform.processor() or 'CPU'})")
    ap.add_argument("--write", action="store_true", help="write the measured sections into the table")
    ap.add_argument("--work", default="", help="keep pools and runs here (a finished run is reused)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per size (the machine's load varies: figures are "
                    "the mean over the runs)")  # fmt: skip
    args = ap.parse_args(argv)
    command = "python bench/plan_calibrate.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="plan_calibrate_") as tmp_dir:
        tmp = Path(args.work or tmp_dir)
        pool = tmp / "pool"
        total, image_bytes = write_pool(pool)
        runs = []
        for rep, size in ((r, int(s)) for r in range(args.repeats) for s in args.sizes.split(",")):
            sub, run = tmp / f"pool{size}", tmp / f"run{size}-{rep}"
            if not sub.exists():
                sub.mkdir()
                for f in sorted(pool.iterdir())[:size]:
                    (sub / f.name).symlink_to(f)
            if (run / "report" / "_SUCCESS.json").exists():  # --work: a finished run is reused, not timed again
                runs.append(cached_run(run))
            else:
                runs.append(curation_run(sub, run))
            wall = "reused" if runs[-1]["wall"] != runs[-1]["wall"] else f"{runs[-1]['wall']:.1f} s wall"
            print(f"run of {size} images: {wall}; stages " + ", ".join(
                f"{s} {r['seconds']:.1f} s" for s, r in runs[-1]["recs"].items()), flush=True)  # fmt: skip
        figures = pooled([run_figures(r, image_bytes) for r in runs])
        for section, vals in kernels().items():
            figures.setdefault(section, {}).update(vals)
        emb = embedders(pool, [m for m in args.models.split(",") if m], args.device)
        figures["embed.cpu"].update(emb)
        figures["ray"] = ray_overheads()
        figures["bytes"]["features"] = feature_bytes(pool)
        figures["report"] = {"s_per_image": report_slope(runs)}
        figures["overhead"] = overheads(runs, figures)
    order = ["ray", "overhead", "ingest", "embed.cpu", "dedupe", "cluster", "retrieve", "shard", "report", "io",
             "rss", "bytes", "funnel.bench"]  # fmt: skip
    text = toml_text({k: figures[k] for k in order if k in figures}, command, args.machine)
    print(text)
    if args.write:
        table = TABLE.read_text()
        head, rest = table.split("# BEGIN measured\n", 1)
        _, tail = rest.split("# END measured\n", 1)
        TABLE.write_text(f"{head}# BEGIN measured\n{text}# END measured\n{tail}")
        print(f"wrote {TABLE}")


if __name__ == "__main__":
    main()
