"""The end-to-end CPU demo (the README's main command): curation -> pretraining -> evaluation on real images.

1. Curation (``curation.demo``): Fashion-MNIST train images as an uncurated pool (files + a tar source) with
   injected near-duplicates, real photos and broken files, plus a small curated seed set; ingest -> embed ->
   dedupe -> cluster -> retrieve -> shard -> report, on an in-process Ray.
2. Pretraining (``pretrain.train``): the tiny CPU recipe on the curated shards, ending with its short
   high-resolution phase; the teacher is exported in the official DINOv2 backbone layout.
3. Evaluation (``pretrain.eval``): k-NN top-1 on Fashion-MNIST test images, exported teacher vs the same
   architecture at random init.
4. Bootstrap (``curation.demo.bootstrap_retrieval``): the same pool re-embedded with the exported teacher
   (``embed.model = "backbone"``, ``embed.name = "auto"``, at its own input size) and retrieved again, reusing
   the curation run's ingest; retrieval precision (retrieved pool images of the seed's class) of the built-in
   descriptor vs our model, on the demo's seed classes and on a held-out seed set of the 7 other classes.

Everything runs locally with embedded defaults; no network, no GPU. Figures are printed and written to
``<out>/demo_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parents[1]


def _eval_shards(out: Path, n_train: int, n_test: int) -> tuple[str, str]:
    """Fashion-MNIST train/test images as labelled shards for the k-NN evaluation."""
    from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = load_fashion_mnist(split, n)
        tars = write_shards(images, labels, str(out / f"fmnist-{split}-%06d.tar"), maxcount=2000)
        paths.append("::".join(tars))
    return paths[0], paths[1]


def _knn(weights: str, train: str, test: str, out: Path, image_size: int) -> dict[str, Any]:
    from pretrain.eval.cli import main as eval_main

    rc = eval_main(["knn", "--weights", weights, "--train", train, "--test", test, "--image-size", str(image_size),
                    "--output", str(out), "--num-workers", "0"])
    if rc != 0:
        raise RuntimeError(f"k-NN evaluation of {weights} failed (exit {rc})")
    return json.loads((out / "knn.json").read_text())


def _top1(result: dict[str, Any], k: int = 20) -> float:
    """Top-1 accuracy in percent at ``k`` from a ``knn.json``."""
    for entry in result["results"]:
        if int(entry["k"]) == k:
            return 100.0 * float(entry["top1"])
    raise KeyError(f"no k={k} entry in the k-NN results")


def main(argv: list[str] | None = None) -> int:
    """Run the demo: ``python -m pretrain demo [--out DIR] [--steps N]``."""
    p = argparse.ArgumentParser(prog="python -m pretrain demo", description=main.__doc__)
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--steps", type=int, default=None, help="pretraining iterations of the main phase "
                   "(default: the tiny recipe's 300)")
    p.add_argument("--pool-size", type=int, default=None, help="Fashion-MNIST pool images for curation")
    p.add_argument("--eval-train", type=int, default=5000, help="labelled train images for k-NN")
    p.add_argument("--eval-test", type=int, default=1000, help="test images for k-NN")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    t_all = time.perf_counter()

    # 1. Curation
    from curation.demo import run_curation_demo

    t0 = time.perf_counter()
    kwargs = {} if args.pool_size is None else {"pool_size": args.pool_size}
    curation = run_curation_demo(str(out / "curation"), **kwargs)
    summary["curation"] = curation
    summary["curation_seconds"] = round(time.perf_counter() - t0, 1)
    shards = str(curation["shards"])

    # 2. Pretraining on the curated shards
    from pretrain.train import TrainConfig, Trainer
    from pretrain.utils.config import load_config

    t0 = time.perf_counter()
    overrides = [f'data.shards.urls=["{shards}"]']
    if args.steps is not None:
        overrides += ["schedule.epoch_length=1", f"schedule.epochs={args.steps}",
                      f"schedule.warmup_epochs={max(1, args.steps // 6)}",
                      f"schedule.warmup_teacher_temp_epochs={max(1, args.steps // 3)}",
                      f"schedule.freeze_last_layer_epochs={max(1, args.steps // 12)}"]
    cfg = load_config(TrainConfig, str(ROOT / "pretrain" / "recipes" / "tiny_cpu.toml"), overrides)
    run_dir = out / "pretrain"
    Trainer(cfg, run_dir).fit()
    summary["pretrain_seconds"] = round(time.perf_counter() - t0, 1)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["pretrain"] = {"steps": metrics[-1]["step"], "first_loss": metrics[0]["loss"],
                           "last_loss": metrics[-1]["loss"],
                           "teacher_entropy": [m["teacher_entropy"] for m in metrics if "teacher_entropy" in m]}

    # 3. k-NN on Fashion-MNIST test images: pretrained teacher vs random init
    import torch

    from pretrain.models import build_backbone, export_backbone

    t0 = time.perf_counter()
    teacher = str(run_dir / "export" / "teacher.pth")
    random_init = str(out / "eval" / "random_init.pth")
    (out / "eval").mkdir(parents=True, exist_ok=True)
    meta = json.loads(Path(teacher + ".json").read_text())
    torch.manual_seed(0)
    export_backbone(build_backbone(meta["name"], **meta["config"]), random_init)
    train, test = _eval_shards(out / "eval" / "data", args.eval_train, args.eval_test)
    size = cfg.data.crops.global_size
    knn_teacher = _knn(teacher, train, test, out / "eval" / "teacher", size)
    knn_random = _knn(random_init, train, test, out / "eval" / "random_init", size)
    summary["knn_top1_teacher"] = _top1(knn_teacher)
    summary["knn_top1_random_init"] = _top1(knn_random)
    summary["eval_seconds"] = round(time.perf_counter() - t0, 1)

    # 4. Bootstrap: re-embed the pool with our teacher and retrieve again (descriptor -> pretrain -> re-embed)
    from curation.demo import bootstrap_retrieval, demo_data
    from curation.stages import LocalExecutor

    t0 = time.perf_counter()
    data = demo_data(out / "curation" / "data", pool_size=args.pool_size or 6000, n_seeds=300, seed=0,
                     seed_classes=("trouser", "bag", "ankle-boot"))  # fmt: skip (run_curation_demo's: reused)
    boot = bootstrap_retrieval(curation["run_dir"], data, {"teacher": teacher}, out / "bootstrap", LocalExecutor())
    summary["bootstrap"] = {
        name: {s: {k: r[k] for k in ("precision", "per_class", "retrieved")} for s, r in res["by_seed_set"].items()}
        | {"kept_after_dedupe": res["kept_after_dedupe"], "seconds": res["seconds"]}
        for name, res in boot.items()
    }
    summary["retrieval_precision"] = {s: {"descriptor": boot["descriptor"]["by_seed_set"][s]["precision"],
                                          "teacher": boot["teacher"]["by_seed_set"][s]["precision"]}
                                      for s in ("demo", "held-out")}  # fmt: skip
    summary["bootstrap_seconds"] = round(time.perf_counter() - t0, 1)
    summary["total_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))

    from curation.demo import format_summary

    print("\n==================== dinoforge demo ====================")
    for line in format_summary(curation).splitlines():
        print(f"curation  {line}")
    p_ = summary["pretrain"]
    print(f"pretrain  steps {p_['steps']}, loss {p_['first_loss']:.3f} -> {p_['last_loss']:.3f}")
    print(f"eval      k-NN top-1 (k=20) Fashion-MNIST test: pretrained teacher {summary['knn_top1_teacher']:.1f}% "
          f"vs random init {summary['knn_top1_random_init']:.1f}%")
    for s_name, what in (("demo", "demo seed classes (trouser, bag, ankle-boot)"),
                         ("held-out", "held-out seed classes (the 7 others)")):
        rp = summary["retrieval_precision"][s_name]
        print(f"bootstrap retrieval precision: descriptor {rp['descriptor']:.3f} -> our model {rp['teacher']:.3f} "
              f"on {what}")
    print(f"time      curation {summary['curation_seconds']} s, pretraining {summary['pretrain_seconds']} s, "
          f"eval {summary['eval_seconds']} s, bootstrap {summary['bootstrap_seconds']} s, "
          f"total {summary['total_seconds']} s")
    print(f"outputs   {out} (summary: {out / 'demo_summary.json'})")
    return 0
