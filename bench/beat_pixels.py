"""Does DINOv2 on CPU learn Fashion-MNIST features that beat raw pixels? What limits the tiny recipe?

Writes the whole Fashion-MNIST train split (60,000 images, shuffled) as WebDataset shards, pretrains DINOv2 with
the trainer (``python -m pretrain train <recipe> --set ...``) once per *variant* at one stated budget (steps x
batch images, one schedule of 10 epochs), and reports k-NN top-1 (cosine, T = 0.07, k = 10 and 20; CLS token of the
exported EMA teacher) on the 10,000 test images with the 60,000 train images as the bank, beside raw pixels and
each architecture at random init. Each variant changes one factor of the previous one, so the table reads as an
ablation of what limits the shipped tiny recipe:

- ``shipped``:  ``tiny_cpu.toml`` as the demo and tests use it (56 px globals / 28 px locals upsampled from 28 px
  images, patch 7, the photo augmentations of DINOv2: blur, solarisation, grayscale, colour jitter, crops of
  40-100% / 10-40% of the image);
- ``aug28``:    + augmentations that keep a 28 px grayscale item recognisable (no blur / solarise / grayscale /
  hue / saturation; crops of 50-100% / 20-50%);
- ``native28``: + native resolution (28 px globals, patch 4: a 7 x 7 grid; 12 px locals), 2x the images/s;
- ``fmnist``:   ``dinov2_fmnist_cpu.toml``, the recipe this bench led to (see its header).

    python bench/beat_pixels.py --workdir /tmp/beat_pixels                        # fmnist recipe, its budget
    python bench/beat_pixels.py --variants shipped aug28 native28 --steps 300      # the ablation, 300 x 64
    python bench/beat_pixels.py --variants fmnist --seeds 0 1 2                    # medians of 3 seeds

``--limit N`` evaluates on the first N bank and N test images (quick checks). Finished runs (``export/`` and the
same request) and finished evaluations are reused. Every training runs with ``OMP_NUM_THREADS=--threads``; CPU
time is the training process's user + system time. Results also land in ``<workdir>/results.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "pretrain" / "recipes"
_AUG28 = ["data.crops.blur_p_global1=0", "data.crops.blur_p_global2=0", "data.crops.blur_p_local=0",
          "data.crops.solarize_p=0", "data.crops.grayscale_p=0", "data.crops.saturation=0", "data.crops.hue=0",
          "data.crops.global_scale=[0.5, 1.0]", "data.crops.local_scale=[0.2, 0.5]"]
_NATIVE28 = ["backbone.overrides={patch_size = 4, img_size = 28, init_values = 0}", "data.crops.global_size=28",
             "data.crops.local_size=12"]
#: name -> (recipe, overrides, eval image size)
VARIANTS: dict[str, tuple[str, list[str], int]] = {
    "shipped": ("tiny_cpu.toml", [], 56),
    "aug28": ("tiny_cpu.toml", _AUG28, 56),
    "native28": ("tiny_cpu.toml", _AUG28 + _NATIVE28, 28),
    "fmnist": ("dinov2_fmnist_cpu.toml", [], 28),
}


def write_data(work: Path) -> tuple[str, str]:
    """All train images (shuffled with seed 0, so every shard mixes classes) and all test images, once."""
    from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards

    data = work / "data"
    if not (data / "done").exists():
        data.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            x, y = load_fashion_mnist(split)
            if split == "train":
                order = np.random.default_rng(0).permutation(len(x))
                x, y = x[order], y[order]
            write_shards(x, y, str(data / f"{split}-%06d.tar"), maxcount=5000)
        (data / "done").write_text("60000 10000")
    return str(data / "train-{000000..000011}.tar"), str(data / "test-{000000..000001}.tar")


def train(work: Path, name: str, seed: int, urls: str, args: argparse.Namespace) -> tuple[Path, dict[str, float]]:
    """One training run of a variant (reused when finished with the same request); returns its dir and costs."""
    recipe, sets, _ = VARIANTS[name]
    if name != "fmnist" or args.steps:
        steps = args.steps or 300
        sets = sets + [f"schedule.epoch_length={max(1, steps // 10)}", "schedule.epochs=10",
                       f"data.shards.batch_size={args.batch}"]
    sets = sets + [f'data.shards.urls=["{urls}"]', f"seed={seed}", "phases=[]", "train.tensorboard=false",
                   "train.checkpoint_every=1000000", "train.log_every=10", "data.shards.num_workers=1"]
    out = work / "runs" / f"{name}-s{seed}" if not args.steps else work / "runs" / f"{name}-{args.steps}-s{seed}"
    request = json.dumps({"recipe": (RECIPES / recipe).read_text(), "sets": sets}, indent=1)
    cost_file = out / "bench_cost.json"
    if (out / "export").is_dir() and cost_file.exists():
        if (out / "bench_request.json").read_text() != request:
            raise SystemExit(f"{out} holds a finished run of other settings; delete it or use another --workdir")
        return out, json.loads(cost_file.read_text())
    argv = [sys.executable, "-m", "pretrain", "train", str(RECIPES / recipe), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_request.json").write_text(request)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "CUDA_VISIBLE_DEVICES": ""}
    print(f"# train {name} seed {seed} -> {out}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"training {name} failed (exit {proc.returncode}); see {out / 'train.log'}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cost = {"wall_s": time.perf_counter() - t0,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "steps": records[-1]["step"], "images": records[-1].get("data/samples", 0)}
    cost_file.write_text(json.dumps(cost))
    return out, cost


def knn(model: torch.nn.Module, bank: str, test: str, size: int, limit: int | None) -> dict[str, float]:
    """k-NN top-1 (%) at k = 10 and 20 of a backbone's CLS features."""
    from pretrain.eval import DataConfig, ExtractConfig, KnnConfig, knn_eval_model

    data = DataConfig(train=bank, test=test, image_size=size, resize_size=size, limit=limit)
    res = knn_eval_model(model.eval(), data, ExtractConfig(batch_size=512, num_workers=0, device="cpu"),
                         KnnConfig(ks=[10, 20]))
    return {str(k): 100 * t for k, t in zip(res.ks, res.top1)}


def pixel_knn(bank: str, test: str, limit: int | None) -> dict[str, float]:
    """The same k-NN on raw pixels / 255 (784-d), same images."""
    import webdataset as wds
    from PIL import Image

    from pretrain.eval import KnnConfig
    from pretrain.eval.knn import knn_predict

    def load(url: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for s in wds.WebDataset(url, shardshuffle=False):
            if limit is not None and len(xs) >= limit:
                break
            img = Image.open(io.BytesIO(s["png"])).convert("L")
            xs.append(np.asarray(img, dtype=np.float32).reshape(-1) / 255)
            ys.append(int(s["cls"]))
        return torch.from_numpy(np.stack(xs)), torch.tensor(ys)

    (xb, yb), (xt, yt) = load(bank), load(test)
    preds = knn_predict(xb, yb, xt, KnnConfig(ks=[10, 20]), num_classes=10, device="cpu")
    return {str(k): 100 * float((preds[k][:, 0] == yt).float().mean()) for k in (10, 20)}


def random_init(name: str, seed: int) -> torch.nn.Module:
    """The variant's backbone at the trainer's initialisation (same seed, built first)."""
    from pretrain.train import TrainConfig
    from pretrain.utils.config import load_config

    recipe, sets, _ = VARIANTS[name]
    cfg = load_config(TrainConfig, str(RECIPES / recipe), sets)
    torch.manual_seed(seed)
    return cfg.backbone.build()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/beat_pixels")
    p.add_argument("--variants", nargs="+", default=["fmnist"], choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=0,
                   help="training steps of every variant (0: the fmnist recipe's own budget; 300 for the others)")
    p.add_argument("--batch", type=int, default=64, help="images per step when --steps is given or for ablations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads of each training run")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N bank and N test images")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    bank, test = write_data(work)
    results: dict[str, Any] = {"limit": args.limit, "variants": {}}
    evals = work / f"evals-{args.limit or 'full'}.json"
    cache = json.loads(evals.read_text()) if evals.exists() else {}
    if "pixels" not in cache:
        cache["pixels"] = pixel_knn(bank, test, args.limit)
    for name in args.variants:
        size = VARIANTS[name][2]
        rows = []
        for seed in args.seeds:
            out, cost = train(work, name, seed, bank, args)
            key = f"{out.name}"
            if key not in cache:
                from pretrain.models import build_backbone

                teacher = build_backbone(None, weights=str(out / "export" / "teacher.pth"))
                cache[key] = knn(teacher, bank, test, size, args.limit)
            rkey = f"random-{name}-s{seed}"
            if rkey not in cache:
                cache[rkey] = knn(random_init(name, seed), bank, test, size, args.limit)
            evals.write_text(json.dumps(cache, indent=1))
            rows.append({"seed": seed, **cost, "knn": cache[key], "random": cache[rkey]})
        results["variants"][name] = rows
    evals.write_text(json.dumps(cache, indent=1))
    results["pixels"] = cache["pixels"]
    (work / "results.json").write_text(json.dumps(results, indent=1))

    n = f"first {args.limit}" if args.limit else "all 60,000 / 10,000"
    print(f"\nk-NN top-1 (cosine, T=0.07), Fashion-MNIST, {n} bank / test images; medians over seeds "
          f"{args.seeds}")
    print("| variant | images seen | wall min | CPU min | k-NN@10 | k-NN@20 | random init @20 |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results["variants"].items():
        def med(f: Any, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(f(r) for r in rows)
        print(f"| {name} | {med(lambda r: r['images']):,.0f} | {med(lambda r: r['wall_s']) / 60:.1f} | "
              f"{med(lambda r: r['cpu_s']) / 60:.1f} | {med(lambda r: r['knn']['10']):.2f} | "
              f"{med(lambda r: r['knn']['20']):.2f} | {med(lambda r: r['random']['20']):.2f} |")
    px = results["pixels"]
    print(f"| raw pixels | - | - | - | {px['10']:.2f} | {px['20']:.2f} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
