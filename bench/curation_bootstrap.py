"""Curation with our own pretrained model: retrieval precision of the built-in descriptor, raw pixels and exports.

The bootstrap loop of the README: curate with the weight-free descriptor -> pretrain on the curated shards ->
export the teacher -> curate again with it as the embedder (``embed.model = "backbone"``, ``embed.name = "auto"``,
``embed.weights = <run>/export/teacher.pth``, ``embed.image_size = 0``: the export's own input size). This bench
measures the last step's payoff on the curation demo's Fashion-MNIST pool (``curation.demo.prepare_demo_data``:
``--pool`` train images, exact duplicates, injected near-duplicates, photos and broken files) with seed sets of
``--n-seeds`` Fashion-MNIST *test* images of classes the demo does not use (default: all 7 of them; the demo's
seed classes are trouser, bag and ankle-boot, run with ``--demo-classes`` for comparison).

For each embedder -- ``descriptor`` (built-in), ``pixels`` (:mod:`curation.models.pixels`, 28 px luminance / 255,
L2-normalised) and every ``--model PATH`` export -- the demo recipe's curation runs from scratch (ingest -> embed
-> dedupe at the recipe's 0.96 -> kNN retrieval, 4 pool images per seed; cluster, shard and report do not change
the retrieval and are skipped) and the table gives:

* ``precision``: the fraction of (seed, retrieved pool image) pairs whose pool image has the seed's class;
* the same per seed class;
* ``any``: the fraction of distinct retrieved images whose label is one of the seed classes (the demo's figure;
  lenient when the seed set covers many classes);
* ``retrieved`` (distinct pool images), ``kept`` (after dedupe with that embedder) and the wall time.

Dedupe runs with each embedder's own embeddings at the demo recipe's threshold (0.96), as the demo would; that
threshold is tuned for the descriptor (192 images removed of 6192), and with other embedders it removes far more
(raw pixels 2474; a ResNet's non-negative features can collapse the pool to a few dozen images). ``--set
dedupe.threshold=1.0`` keeps every image, so the rows then compare retrieval alone on the same pool.

    python bench/curation_bootstrap.py --model /tmp/exp/r3/export/teacher.pth --demo-classes
    python bench/curation_bootstrap.py --pool 300 --n-seeds 40 --classes sandal coat   # a quick check

Results also land in ``<workdir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.demo import CLASSES, curate_retrieval, embedder_overrides, prepare_demo_data  # noqa: E402

DEMO_CLASSES = ["trouser", "bag", "ankle-boot"]
HELD_OUT = [c for c in CLASSES if c not in DEMO_CLASSES]


def run(workdir: str, *, models: list[str], embedders: list[str], classes: list[str], demo_classes: bool = False,
        pool: int = 6000, n_seeds: int = 300, num_cpus: int = 2, address: str = "", seed: int = 0,
        overrides: list[str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Curate the pool once per (seed class set, embedder); return one result row per pair."""
    from curation.config import RayConfig
    from curation.ray import executor_for

    sets = {"held-out": classes} | ({"demo": DEMO_CLASSES} if demo_classes else {})
    rows: list[dict[str, Any]] = []
    with executor_for(RayConfig(address=address, num_cpus=num_cpus)) as executor:
        for set_name, set_classes in sets.items():
            root = Path(workdir) / set_name
            data = prepare_demo_data(root / "data", pool_size=pool, n_seeds=n_seeds, seed_classes=set_classes,
                                     seed=seed)  # fmt: skip
            for i, spec in enumerate([*embedders, *models]):
                name = spec if spec in ("descriptor", "pixels") else _model_name(spec)
                ray_addr = ['ray.address="none"'] if address == "none" else []
                res = curate_retrieval(data, str(root / f"run-{i}-{Path(name).name}"), executor,
                                       overrides=[*embedder_overrides(spec), *ray_addr, *(overrides or [])],
                                       num_cpus=num_cpus,
                                       seed=seed)  # fmt: skip
                rows.append({"seed_classes": set_name, "classes": list(set_classes), "embedder": name, "spec": spec,
                             "seeds": data.seeds, "overrides": list(overrides or []), **res})  # fmt: skip
                logging.getLogger("bench").info("%s / %s: precision %.3f (%.1f s)", set_name, name,
                                                res["precision"], res["seconds"])  # fmt: skip
    return rows


def _model_name(path: str) -> str:
    p = Path(path)
    run = p.parent.parent.name if p.parent.name == "export" else p.parent.name
    return f"{run}/{p.name}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """One table per seed class set: embedder, precision overall and per class, any-class, retrieved, time."""
    out = []
    for set_name in dict.fromkeys(r["seed_classes"] for r in rows):
        sub = [r for r in rows if r["seed_classes"] == set_name]
        classes = sub[0]["classes"]
        w = max(12, *(len(r["embedder"]) for r in sub))
        head = f"{'embedder':<{w}} {'precision':>9} " + " ".join(f"{c[:8]:>8}" for c in classes)
        head += f" {'any':>6} {'retrieved':>9} {'kept':>6} {'wall s':>7}"
        extra = f"; --set {' '.join(sub[0]['overrides'])}" if sub[0].get("overrides") else ""
        out += [f"seed classes ({set_name}, {sub[0]['seeds']} seeds): {', '.join(classes)}{extra}", head,
                "-" * len(head)]
        for r in sub:
            per = " ".join(f"{r['per_class'][c]:>8.3f}" if r["per_class"][c] is not None else f"{'-':>8}"
                           for c in classes)  # fmt: skip
            out.append(f"{r['embedder']:<{w}} {r['precision']:>9.3f} {per} {r['precision_any_seed_class']:>6.3f} "
                       f"{r['retrieved']:>9} {r['kept_after_dedupe']:>6} {r['seconds']:>7.1f}")  # fmt: skip
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/curation_bootstrap")
    p.add_argument("--model", action="append", default=[], metavar="PATH",
                   help="a backbone export (teacher.pth / backbone.pth with its .json sidecar); repeatable")
    p.add_argument("--embedders", nargs="*", default=["descriptor", "pixels"], choices=["descriptor", "pixels"])
    p.add_argument("--classes", nargs="+", default=HELD_OUT, choices=CLASSES,
                   help=f"seed classes (default: those the demo does not use: {' '.join(HELD_OUT)})")
    p.add_argument("--demo-classes", action="store_true", help="also run the demo's seed classes "
                   f"({' '.join(DEMO_CLASSES)}) for comparison")  # fmt: skip
    p.add_argument("--pool", type=int, default=6000, help="Fashion-MNIST train images in the pool")
    p.add_argument("--n-seeds", type=int, default=300, help="seed images (Fashion-MNIST test) per seed class set")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--address", default="", help='Ray address ("" = in-process Ray, "none" = no Ray)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="extra demo-recipe setting for every run, e.g. dedupe.threshold=1.0 (no near-duplicate "
                   "removal: the recipe's 0.96 is tuned for the descriptor and removes 40%% of the pool with pixels)")
    args = p.parse_args(argv)
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "disabled"),
                       ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")):  # fmt: skip
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    t0 = time.perf_counter()
    rows = run(args.workdir, models=args.model, embedders=args.embedders, classes=args.classes,
               demo_classes=args.demo_classes, pool=args.pool, n_seeds=args.n_seeds, num_cpus=args.num_cpus,
               address=args.address, seed=args.seed, overrides=args.overrides)  # fmt: skip
    total = time.perf_counter() - t0
    print(format_table(rows))
    print(f"pool {args.pool} Fashion-MNIST train images (+ copies, photos, broken files); total {total:.0f} s")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    (Path(args.workdir) / "results.json").write_text(json.dumps({"rows": rows, "seconds": round(total, 1),
                                                                 "args": vars(args)}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
