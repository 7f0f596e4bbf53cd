"""Two-stage copy detection on the copy benchmark: descriptor candidates, then local-feature verification.

    .venv/bin/python bench/copy_verify.py           # defaults of DedupeConfig / VerifyConfig, both halves
    .venv/bin/python bench/copy_verify.py --sweep   # also the calibration grid (calibration half only)

The benchmark (:mod:`curation.verify.bench_data`: real photos from skimage, scikit-learn and mate-backgrounds,
look-alike tiles, 16 edit families) is split by source photo. Each half is its own pool: embedded with the
built-in descriptor as the embed stage does, each image's ``max_candidates`` best neighbours above
``candidate_threshold`` are verified (:func:`curation.verify.check_pair`), and the connected components of the
verified pairs are scored against the ground-truth groups (pair precision / recall), overall and per edit family,
beside the single-threshold baseline (descriptor alone at ``recipes/default.toml``'s 0.42, k = 64). Defaults are
chosen on the calibration half (``--sweep``) and the held-out half is reported. The low-texture graphics (smooth
wallpapers) are reported on their own. Costs are single-threaded (one BLAS and one OpenCV thread, as a Ray task
with one CPU): decode + descriptor per image, decode + feature extraction per image, verification per pair.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from dataclasses import replace
from typing import Any

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from curation.config import DedupeConfig, VerifyConfig
from curation.verify import bench_data
from curation.verify.edits import FAMILIES
from curation.verify.evaluate import candidate_pairs, components, embed_images, features_of, pair_scores, verify_pairs

BASELINE_THRESHOLD = 0.42  # recipes/default.toml's single-threshold cut of the built-in descriptor
BASELINE_K = 64


def _scores(labels: np.ndarray, groups: list[str], fams: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"all": pair_scores(labels, groups)}
    for fam in FAMILIES:
        mask = [f == fam for f in fams]
        if any(mask):
            out[fam] = pair_scores(labels, groups, mask)
    return out


def evaluate_pool(images: list[bench_data.BenchImage], dedupe: DedupeConfig, sweep: bool = False) -> dict[str, Any]:
    """Embed, propose, verify and score one pool; with ``sweep`` also keep what the calibration grid needs."""
    vcfg = dedupe.verification
    blobs = [x.data for x in images]
    groups, fams = [x.group for x in images], [x.family for x in images]
    n = len(images)
    emb, embed_s = embed_images(blobs)
    feats, feat_s = features_of(blobs, vcfg)
    widest = (min(dedupe.candidate_threshold, 0.0), max(dedupe.max_candidates, 48)) if sweep else \
        (dedupe.candidate_threshold, dedupe.max_candidates)  # fmt: skip
    cands = candidate_pairs(emb, *widest)
    checks, pair_s = verify_pairs(cands, feats, vcfg)
    chosen = candidate_pairs(emb, dedupe.candidate_threshold, dedupe.max_candidates)
    verified = components(n, [p for p in chosen if checks[p].verdict])
    base = components(n, list(candidate_pairs(emb, BASELINE_THRESHOLD, BASELINE_K)))
    return {
        "n": n,
        "verified": _scores(verified, groups, fams),
        "baseline": _scores(base, groups, fams),
        "candidates_per_image": len(chosen) / max(1, n),
        "verified_pairs": sum(checks[p].verdict for p in chosen),
        "embed_ms_per_image": 1000 * embed_s,
        "features_ms_per_image": 1000 * feat_s,
        "verify_ms_per_pair": 1000 * pair_s,
        "verify_ms_per_image": 1000 * (feat_s + pair_s * len(chosen) / max(1, n)),
        "_sweep": (emb, checks, groups) if sweep else None,
    }


def _grid(pool: dict[str, Any]) -> list[tuple[float, float, float, tuple[Any, ...]]]:
    """Calibration grid over the candidate and verdict settings (features fixed): (precision, recall, cand/img)."""
    emb, checks, groups = pool["_sweep"]
    n = len(groups)
    rows = []
    for thr, maxc in itertools.product((0.0, 0.1, 0.2, 0.3), (8, 16, 24, 32, 48)):
        cands = candidate_pairs(emb, thr, maxc)
        for mi, mr, ms, ma in itertools.product((4, 5, 6, 8, 10, 12, 16), (0.0, 0.2, 0.4), (0.0, 0.02, 0.05, 0.08),
                                                (0.0, 0.3, 0.5, 0.7)):  # fmt: skip
            edges = [p for p in cands if (c := checks[p]).model != "none" and c.inliers >= mi and c.ratio >= mr
                     and c.spread >= ms and c.agreement >= ma]  # fmt: skip
            s = pair_scores(components(n, edges), groups)
            rows.append((s.precision, s.recall, len(cands) / n, (thr, maxc, mi, mr, ms, ma)))
    return rows


def _table(name: str, pool: dict[str, Any]) -> None:
    v, b = pool["verified"], pool["baseline"]
    print(f"\n== {name}: {pool['n']} images, {pool['candidates_per_image']:.1f} candidates/image, "
          f"{pool['verified_pairs']} verified pairs")  # fmt: skip
    print(f"{'family':<12} {'verified P':>10} {'verified R':>10} {'baseline P':>10} {'baseline R':>10} {'pairs':>6}")
    for fam, s in v.items():
        print(f"{fam:<12} {s.precision:>10.3f} {s.recall:>10.3f} {b[fam].precision:>10.3f} {b[fam].recall:>10.3f} "
              f"{s.true:>6}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies", type=int, default=8, help="edited copies per group")
    ap.add_argument("--photos", type=int, default=0, help="source photos per half (0 = all)")
    ap.add_argument("--sweep", action="store_true", help="print the calibration grid (calibration half)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a dedupe.verification field, e.g. --set max_side=384")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cv2.setNumThreads(1)
    dedupe = DedupeConfig()
    overrides = {k: type(getattr(dedupe.verification, k))(v) for k, v in (s.split("=", 1) for s in args.set)}
    dedupe = replace(dedupe, verification=replace(dedupe.verification, **overrides))
    t0 = time.perf_counter()
    with threadpool_limits(1):
        images = bench_data.build(args.seed, args.copies, photos=args.photos)
        low = bench_data.build(args.seed, args.copies, photos=args.photos, low_texture=True)
        pools = {half: evaluate_pool([x for x in images if x.half == half], dedupe, args.sweep and half == HALF_CAL)
                 for half in bench_data.HALVES}  # fmt: skip
        if low:
            pools["low_texture"] = evaluate_pool(low, dedupe)
        grid = _grid(pools[HALF_CAL]) if args.sweep else []
    v = dedupe.verification
    print(f"copy benchmark: {len(images)} photos+copies, {len(low)} low-texture; candidate_threshold="
          f"{dedupe.candidate_threshold} max_candidates={dedupe.max_candidates} " + " ".join(
              f"{k}={getattr(v, k)}" for k in VerifyConfig.__dataclass_fields__))  # fmt: skip
    for name, pool in pools.items():
        _table(name, pool)
    if grid:
        best = sorted((r for r in grid if r[0] >= 0.99), key=lambda r: (-round(r[1], 3), r[2]))[:20]
        print("\n== calibration grid (precision >= 0.99, best recall, then fewest candidates)")
        print("(candidate_threshold, max_candidates, min_inliers, min_inlier_ratio, min_spread, min_agreement)")
        for p, r, c, key in best:
            print(f"  P {p:.3f} R {r:.3f} cand/img {c:5.1f}  {key}")
    print("\n== cost (single-threaded, ms)")
    for name, pool in pools.items():
        print(f"  {name:<12} embed/image {pool['embed_ms_per_image']:.1f}  features/image "
              f"{pool['features_ms_per_image']:.1f}  verify/pair {pool['verify_ms_per_pair']:.2f}  "
              f"verify/image (features + pairs) {pool['verify_ms_per_image']:.1f}  "
              f"candidates/image {pool['candidates_per_image']:.1f}")  # fmt: skip
    figures = {
        name: {
            "precision": round(pool["verified"]["all"].precision, 4),
            "recall": round(pool["verified"]["all"].recall, 4),
            "baseline_precision": round(pool["baseline"]["all"].precision, 4),
            "baseline_recall": round(pool["baseline"]["all"].recall, 4),
            "families": {f: [round(s.precision, 3), round(s.recall, 3)] for f, s in pool["verified"].items()
                         if f != "all"},  # fmt: skip
            **{k: round(pool[k], 3) for k in ("candidates_per_image", "embed_ms_per_image", "features_ms_per_image",
                                              "verify_ms_per_pair", "verify_ms_per_image")},  # fmt: skip
        }
        for name, pool in pools.items()
    }
    held = figures[bench_data.HALVES[1]]
    result = {"bench": "copy_verify", "images": len(images), "seconds": round(time.perf_counter() - t0, 1),
              "target_met": held["precision"] >= 0.97 and held["recall"] >= 0.9, **figures}  # fmt: skip
    print(json.dumps(result))
    return result


HALF_CAL = bench_data.HALVES[0]

if __name__ == "__main__":
    main()
