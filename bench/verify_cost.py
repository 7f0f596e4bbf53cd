"""What geometric verification adds to a curation run, side by side with ingest + embed, on real photos.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \\
        .venv/bin/python bench/verify_cost.py [--runs 3] [--original-side 768]

The pool is the copy benchmark (:mod:`curation.verify.bench_data`: real photos from skimage, scikit-learn and
mate-backgrounds, look-alike tiles and edited copies, both halves) written as files. Each run is the user's
command, ``python -m curation run default --out RUN --set ingest.sources=[POOL]`` (in-process Ray on every CPU of
the machine), once with ``dedupe.verify = true`` (the default) and once with ``false``, in fresh run directories.
Ingest and embed are split into parts of 128 files / 256 rows so they also use every CPU (a conservative
comparison: with the recipe's 4096-row parts a pool this small is embedded by one task).

Printed per run and as medians: ingest + embed wall seconds; verification wall seconds (locate, features and
verify steps of the dedupe stage, ``verify_wall_seconds``) and its ratio to ingest + embed; the dedupe stage's
wall with and without verification; feature extraction CPU ms per image; verification CPU ms per checked pair;
candidate pairs per image. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["ingest.files_per_part=128", "ingest.rows_per_part=256"]


def _pool(path: Path, seed: int, copies: int, side: int) -> int:
    from curation.verify import bench_data

    path.mkdir(parents=True, exist_ok=True)
    images = bench_data.build(seed, copies, original_side=side)
    for i, x in enumerate(images):
        ext = "png" if x.data[:4] == b"\x89PNG" else "jpg"
        (path / f"{i:05d}.{ext}").write_bytes(x.data)
    return len(images)


def _record(run: Path, name: str) -> dict[str, Any]:
    return json.loads((run / name / "_SUCCESS.json").read_text())


def _run(pool: Path, run: Path, verify: bool) -> dict[str, Any]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    sets = [f'ingest.sources=["{pool}"]', f"dedupe.verify={'true' if verify else 'false'}", *PARTS]
    cmd = [sys.executable, "-m", "curation", "run", "default", "--out", str(run)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    ing, emb, ded = _record(run, "manifest"), _record(run, "embeddings"), _record(run, "dedup")
    out = {"ingest_s": ing["seconds"], "embed_s": emb["seconds"], "dedupe_s": ded["seconds"], "run_s": wall,
           "images": ded["in"], "kept": ded["out"]}  # fmt: skip
    if verify:
        out.update(verify_s=ded["verify_wall_seconds"], candidates=ded["candidates"],
                   checked=ded["checked_pairs"], connected=ded["connected_pairs"],
                   feature_images=ded["verified_images"], features_cpu_s=ded["features_seconds"],
                   verify_cpu_s=ded["verify_seconds"])  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies", type=int, default=8, help="edited copies per photo")
    ap.add_argument("--original-side", type=int, default=768, help="long side of the original photos (pixels)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="verify_cost_") as tmp:
        pool = Path(tmp) / "pool"
        n = _pool(pool, args.seed, args.copies, args.original_side)
        print(f"pool: {n} real photos and copies (originals <= {args.original_side} px), {os.cpu_count()} CPUs")
        for r in range(args.runs):
            on = _run(pool, Path(tmp) / f"on{r}", True)
            off = _run(pool, Path(tmp) / f"off{r}", False)
            base = on["ingest_s"] + on["embed_s"]
            row = {**on, "ingest_embed_s": base, "ratio": on["verify_s"] / base,
                   "dedupe_noverify_s": off["dedupe_s"], "kept_noverify": off["kept"]}  # fmt: skip
            rows.append(row)
            print(f"run {r}: ingest+embed {base:.1f} s, verification {on['verify_s']:.1f} s "
                  f"({100 * row['ratio']:.0f}%), dedupe {on['dedupe_s']:.1f} s vs {off['dedupe_s']:.1f} s without "
                  f"verification; kept {on['kept']} vs {off['kept']}")  # fmt: skip
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], int | float)}
    images = med["images"]
    summary = {
        "bench": "verify_cost", "images": images, "runs": len(rows),
        "ingest_embed_s": round(med["ingest_embed_s"], 2), "verify_s": round(med["verify_s"], 2),
        "verify_over_ingest_embed": round(med["ratio"], 3),
        "dedupe_s": round(med["dedupe_s"], 2), "dedupe_noverify_s": round(med["dedupe_noverify_s"], 2),
        "candidates_per_image": round(med["candidates"] / images, 2),
        "checked_per_image": round(med["checked"] / images, 2),
        "features_cpu_ms_per_image": round(1000 * med["features_cpu_s"] / max(1, med["feature_images"]), 1),
        "verify_cpu_ms_per_pair": round(1000 * med["verify_cpu_s"] / max(1, med["checked"]), 2),
        "ingest_embed_ms_per_image": round(1000 * med["ingest_embed_s"] / images, 1),
        "verify_ms_per_image": round(1000 * med["verify_s"] / images, 1),
        "target_met": med["ratio"] <= 0.5,
    }  # fmt: skip
    print(f"median of {len(rows)}: ingest+embed {summary['ingest_embed_s']} s, verification {summary['verify_s']} s "
          f"= {100 * summary['verify_over_ingest_embed']:.0f}% (target <= 50%); {summary['candidates_per_image']} "
          f"candidates/image, {summary['checked_per_image']} checked/image; features "
          f"{summary['features_cpu_ms_per_image']} ms/image, {summary['verify_cpu_ms_per_pair']} ms/pair (CPU)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
