"""SSL sanity run: a tiny ViT pretrained on CPU on real images with the full DINOv2 objective, then k-NN.

Writes Fashion-MNIST train images as WebDataset shards, runs ``python -m pretrain train`` with the tiny CPU
recipe (DINO + iBOT + KoLeo, EMA teacher, multi-crop, block masks) for a few hundred steps, and prints

- the loss curve (each term, mean over windows of ``--window`` steps),
- the collapse monitors at start and end: teacher entropy against log K, marginal entropy, KL(teacher||student),
  embedding std and effective rank,
- a verdict: the loss decreases and nothing collapses (teacher entropy well away from 0 and from log K, the
  batch uses many prototypes, CLS features keep a rank above 1),
- k-NN top-1 on Fashion-MNIST test images of the exported teacher against the same backbone at random init
  (and, as a stronger reference, the same k-NN on raw pixels).

    python bench/ssl_sanity.py                              # 300 steps, batch 32, fp32, 1 torch thread
    python bench/ssl_sanity.py --steps 120 --batch 16 --knn-test 1000
    python bench/ssl_sanity.py --set schedule.base_lr=0.002 --set heads.out_dim=2048

Training 300 steps at batch 32 takes ~200 s on a 2-core VM (two runs side by side, ~0.65 s/step), the k-NN
feature extraction ~30 s more. ``--set`` overrides go to the recipe as in ``python -m pretrain train``.
The exit status is 0 when the verdict and the k-NN gain (``--min-gain`` points) hold, 1 otherwise. Figures also
land in ``<out>/ssl_sanity.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
MONITORS = ("teacher_entropy", "teacher_marginal_entropy", "kl_teacher_student", "embedding_std", "effective_rank")


def write_data(out: Path, n_train: int, n_knn_train: int, n_knn_test: int) -> dict[str, str]:
    """Fashion-MNIST shards: pretraining images (labels unused), k-NN memory (train split, labelled, as the DINO
    protocol) and k-NN test (the test split); class-balanced heads of each split."""
    from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards

    out.mkdir(parents=True, exist_ok=True)
    urls = {}
    for name, split, n in (("pretrain", "train", n_train), ("knn_train", "train", n_knn_train),
                           ("knn_test", "test", n_knn_test)):
        images, labels = load_fashion_mnist(split, n)
        paths = write_shards(images, labels, str(out / f"{name}-%06d.tar"), maxcount=1000)
        urls[name] = str(out / f"{name}-{{000000..{len(paths) - 1:06d}}}.tar")
    return urls


def run_overrides(urls: str, args: argparse.Namespace) -> list[str]:
    """Recipe overrides: our shards, ``--steps`` as 6 epochs, metrics and collapse monitors at every step."""
    epoch = max(1, args.steps // 6)
    sets = {
        "data.shards.urls": f'["{urls}"]', "data.shards.batch_size": str(args.batch),
        "data.shards.num_workers": str(args.workers), "data.shards.label_key": '"cls"',
        "schedule.epoch_length": str(epoch), "schedule.epochs": "6",
        "train.log_every": "1", "train.monitor_every": "1", "train.tensorboard": "false",
        "train.checkpoint_every": str(10 * args.steps), "phases": "[]", "train.precision": f'"{args.precision}"',
    }
    return [f"{k}={v}" for k, v in sets.items()] + list(args.overrides)


def train(recipe: str, run_dir: Path, overrides: list[str], threads: int) -> float:
    """``python -m pretrain train`` in a subprocess (log in ``run_dir/train.log``); returns its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pretrain", "train", recipe, "--out", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training failed (exit {proc.returncode}):\n{tail}")
    return time.perf_counter() - t0


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def loss_curve(records: list[dict[str, Any]], window: int) -> list[dict[str, float]]:
    """Mean of each loss term over consecutive windows of ``window`` steps."""
    rows = []
    for start in range(0, records[-1]["step"], window):
        win = [r for r in records if start < r["step"] <= start + window]
        if not win:
            continue
        row = {"steps": f"{start + 1}-{win[-1]['step']}"}
        for k in ("loss", "dino", "ibot", "koleo", "lr", "teacher_temp"):
            vals = [r[k] for r in win if k in r]
            if vals:
                row[k] = statistics.fmean(vals)
        row["img_per_s"] = statistics.median(r["img_per_s"] for r in win)
        rows.append(row)
    return rows


def verdict(curve: list[dict[str, float]], start: dict[str, float], end: dict[str, float], log_k: float
            ) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for: loss decreases, no sharpening / uniform collapse, features not collapsed."""
    first, last = curve[0]["loss"], curve[-1]["loss"]
    peak = max(r["loss"] for r in curve)
    h, hm = end["teacher_entropy"], end["teacher_marginal_entropy"]
    return [
        ("loss decreases", last < first and last < peak,
         f"first window {first:.3f}, peak {peak:.3f}, last window {last:.3f}"),
        ("teacher entropy away from 0", h > 0.1 * log_k, f"{h:.3f} > 0.1 log K = {0.1 * log_k:.3f}"),
        ("teacher entropy away from log K", h < 0.9 * log_k, f"{h:.3f} < 0.9 log K = {0.9 * log_k:.3f}"),
        ("many prototypes used", hm > 0.5 * log_k, f"marginal entropy {hm:.3f} > 0.5 log K = {0.5 * log_k:.3f}"),
        ("CLS features not collapsed", end["effective_rank"] > 2.0 and end["embedding_std"] > 0.1 * start[
            "embedding_std"], f"effective rank {end['effective_rank']:.2f} > 2, embedding std "
                              f"{end['embedding_std']:.4f} > 0.1 x start {start['embedding_std']:.4f}"),
    ]


def knn_top1(model: Any, urls: dict[str, str], image_size: int, ks: list[int]) -> dict[int, float]:
    """k-NN top-1 (%) per k of a backbone on the Fashion-MNIST test shards, train shards as memory."""
    from pretrain.eval import DataConfig, ExtractConfig, KnnConfig, knn_eval_model

    data = DataConfig(train=urls["knn_train"], test=urls["knn_test"], image_size=image_size, resize_size=image_size)
    extract = ExtractConfig(batch_size=256, num_workers=0, device="cpu", precision="fp32")
    res = knn_eval_model(model, data, extract, KnnConfig(ks=ks))
    return {k: 100 * t for k, t in zip(res.ks, res.top1)}


def pixel_knn_top1(n_train: int, n_test: int, ks: list[int]) -> dict[int, float]:
    """Reference: the same weighted k-NN on raw 28x28 pixels (cosine), same train / test images."""
    import torch

    from pretrain.eval import KnnConfig
    from pretrain.eval.fashion_mnist import load_fashion_mnist
    from pretrain.eval.knn import knn_predict

    (xtr, ytr), (xte, yte) = load_fashion_mnist("train", n_train), load_fashion_mnist("test", n_test)
    feats = [torch.from_numpy(x.reshape(len(x), -1).astype("float32") / 255) for x in (xtr, xte)]
    preds = knn_predict(feats[0], torch.from_numpy(ytr), feats[1], KnnConfig(ks=ks), num_classes=10, device="cpu")
    y = torch.from_numpy(yte)
    return {k: 100 * float((preds[k][:, 0] == y).float().mean()) for k in ks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(ROOT / "pretrain" / "recipes" / "tiny_cpu.toml"))
    p.add_argument("--out", default=None, help="work directory (default: a temporary one, removed at the end)")
    p.add_argument("--steps", type=int, default=300, help="training steps (6 epochs of steps // 6)")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the trainer (1 is fastest on a shared, loaded machine)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="trainer precision (fp32: CPU bf16 autocast is ~5x slower without AVX512-BF16 / AMX)")
    p.add_argument("--train-images", type=int, default=10000, help="Fashion-MNIST train images to pretrain on")
    p.add_argument("--knn-train", type=int, default=5000, help="labelled train images forming the k-NN memory")
    p.add_argument("--knn-test", type=int, default=2000, help="test images evaluated")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 20])
    p.add_argument("--window", type=int, default=25, help="steps per loss-curve row and between monitor rows")
    p.add_argument("--min-gain", type=float, default=5.0, help="required k-NN top-1 gain (points) over random init")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override passed to the trainer (repeatable)")
    args = p.parse_args(argv)
    if args.steps < 6 * 2 or args.batch < 2:
        raise SystemExit("--steps must be >= 12 and --batch >= 2")

    import torch

    from pretrain.eval import load_backbone
    from pretrain.eval.config import BackboneConfig as EvalBackbone
    from pretrain.train import TrainConfig
    from pretrain.utils.config import load_config

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ssl-sanity-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        data_dir, run_dir = out / "data", out / "run"
        if (run_dir / "metrics.jsonl").exists():
            raise SystemExit(f"{run_dir} already holds a run: pick another --out")
        t0 = time.perf_counter()
        urls = write_data(data_dir, args.train_images, args.knn_train, args.knn_test)
        overrides = run_overrides(urls["pretrain"], args)
        cfg = load_config(TrainConfig, args.recipe, overrides)
        total = cfg.schedule.total_iters
        print(f"recipe {args.recipe}: {cfg.backbone.name} {cfg.backbone.overrides}, K={cfg.heads.out_dim}, "
              f"batch {args.batch}, {total} steps, crops 2x{cfg.data.crops.global_size}+"
              f"{cfg.data.crops.n_local}x{cfg.data.crops.local_size}, loss weights dino/ibot/koleo "
              f"{cfg.loss.dino_weight}/{cfg.loss.ibot_weight}/{cfg.loss.koleo_weight}, {cfg.train.precision}, "
              f"threads {args.threads}")
        print(f"data: {args.train_images} Fashion-MNIST train images ({time.perf_counter() - t0:.0f} s to write)")
        train_s = train(args.recipe, run_dir, overrides, args.threads)
        records = read_metrics(run_dir)
        print(f"training: {train_s:.0f} s wall ({train_s / total:.2f} s/step incl. start-up)\n")

        curve = loss_curve(records, args.window)
        print(f"{'steps':>9} {'loss':>7} {'dino':>7} {'ibot':>7} {'koleo':>7} {'lr':>9} {'t_temp':>7} {'img/s':>7}")
        for r in curve:
            print(f"{r['steps']:>9} {r['loss']:7.3f} {r.get('dino', math.nan):7.3f} {r.get('ibot', math.nan):7.3f} "
                  f"{r.get('koleo', math.nan):7.3f} {r['lr']:9.2e} {r['teacher_temp']:7.4f} {r['img_per_s']:7.1f}")

        mon = [r for r in records if "teacher_entropy" in r and (r["step"] == 1 or r["step"] % args.window == 0)]
        start, end = mon[0], mon[-1]
        log_k = math.log(cfg.heads.out_dim)
        print(f"\ncollapse monitors (log K = {log_k:.3f}):")
        print(f"{'step':>6} " + " ".join(f"{m:>24}" for m in MONITORS))
        for r in mon:
            print(f"{r['step']:>6} " + " ".join(f"{r[m]:24.4f}" for m in MONITORS))
        checks = verdict(curve, start, end, log_k)
        print("\nverdict:")
        for name, ok, detail in checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")

        t1 = time.perf_counter()
        size = cfg.data.crops.global_size
        torch.manual_seed(cfg.seed)  # the trainer's init: same seed, backbone built first
        random_init = cfg.backbone.build().eval()
        teacher = load_backbone(EvalBackbone(weights=str(run_dir / "export" / "teacher.pth")))
        knn_rand = knn_top1(random_init, urls, size, args.ks)
        knn_teacher = knn_top1(teacher, urls, size, args.ks)
        knn_pixels = pixel_knn_top1(args.knn_train, args.knn_test, args.ks)
        print(f"\nk-NN top-1 on {args.knn_test} Fashion-MNIST test images ({args.knn_train} train as memory, "
              f"{size} px, {time.perf_counter() - t1:.0f} s):")
        print(f"{'k':>4} {'random init':>12} {'teacher':>9} {'gain':>7} {'raw pixels':>11}")
        for k in args.ks:
            print(f"{k:>4} {knn_rand[k]:11.2f}% {knn_teacher[k]:8.2f}% {knn_teacher[k] - knn_rand[k]:+6.2f} "
                  f"{knn_pixels[k]:10.2f}%")
        print("(random init: the same backbone before training - with the recipe's LayerScale off its CLS token "
              "already separates images; raw pixels are the stronger reference)")
        k_main = 20 if 20 in args.ks else args.ks[0]
        gain = knn_teacher[k_main] - knn_rand[k_main]
        ok_all = all(ok for _, ok, _ in checks) and gain >= args.min_gain
        print(f"\nk-NN gain at k={k_main}: {gain:+.2f} points (need >= {args.min_gain}); "
              f"overall: {'PASS' if ok_all else 'FAIL'}; total {time.perf_counter() - t0:.0f} s")
        summary = {"steps": total, "batch": args.batch, "curve": curve, "monitors": mon, "log_k": log_k,
                   "verdict": [{"check": n, "ok": ok, "detail": d} for n, ok, d in checks],
                   "knn_random_init": knn_rand, "knn_teacher": knn_teacher, "knn_pixels": knn_pixels, "gain": gain,
                   "ok": ok_all,
                   "train_s": train_s, "overrides": overrides}
        (out / "ssl_sanity.json").write_text(json.dumps(summary, indent=2))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
