"""Gram anchoring's effect on dense features (issue 17): patch-level k-NN segmentation of Fashion-MNIST composites.

    .venv/bin/python bench/gram_dense.py                  # 300 steps per run (the tiny recipes' length)
    .venv/bin/python bench/gram_dense.py --steps 150      # a quicker look

Data: 56 x 56 px composites, a 2 x 2 grid of quadrants each holding a Fashion-MNIST item (28 x 28, shifted by up
to 4 px) with probability 0.75, else left empty. Pixel label: the item's class where its pixel is > 32, background
(label 10) elsewhere; patch label (7 x 7 px patches, an 8 x 8 grid): the majority label of its pixels.

Training: the tiny ViT (``tiny_cpu.toml``, 56 px global crops) on composites of training images, twice from the
same seed for the same steps: without Gram anchoring, and with ``tiny_cpu_gram.toml``'s Gram settings (weight 1,
starting at half the steps, the Gram teacher refreshed every ``steps / 6``).

Evaluation: patch tokens of each exported backbone (and of the random-init backbone) on ``--bank`` composites of
other training images and ``--test`` composites of test images (whole 56 px composites, no augmentation); every test
patch takes the majority label of its k = 20 nearest bank patches (cosine). Prints patch accuracy, mean IoU over
the 11 labels, foreground accuracy (patches whose label is an item) and the image-level k-NN of the CLS token on
single test items, as a table and a JSON line. Runs are kept in ``--workdir`` and reused when their settings match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from distill_fmnist import _run  # noqa: E402  (the same runner as the distillation bench)

from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pretrain.eval.fashion_mnist import load_fashion_mnist, write_shards  # noqa: E402
from pretrain.models import build_backbone  # noqa: E402

TINY = str(ROOT / "pretrain" / "recipes" / "tiny_cpu.toml")
SIDE, PATCH, BACKGROUND = 56, 7, 10


def composites(images: np.ndarray, labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` composites (n, 56, 56) uint8 and their patch labels (n, 64) drawn from ``images`` / ``labels``."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, SIDE, SIDE), np.uint8)
    pix = np.full((n, SIDE, SIDE), BACKGROUND, np.int64)
    for i in range(n):
        for qy in range(2):
            for qx in range(2):
                if rng.random() >= 0.75:
                    continue
                j = int(rng.integers(len(images)))
                dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
                y0, x0 = max(0, min(SIDE - 28, 28 * qy + dy)), max(0, min(SIDE - 28, 28 * qx + dx))
                item = images[j]
                region = out[i, y0:y0 + 28, x0:x0 + 28]
                np.maximum(region, item, out=region)
                pix[i, y0:y0 + 28, x0:x0 + 28][item > 32] = int(labels[j])
    g = SIDE // PATCH
    blocks = pix.reshape(n, g, PATCH, g, PATCH).transpose(0, 1, 3, 2, 4).reshape(n, g * g, PATCH * PATCH)
    patch_labels = np.array([[np.bincount(b, minlength=BACKGROUND + 1).argmax() for b in img] for img in blocks])
    return out, patch_labels


def _tensor(images: np.ndarray) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return (x - mean) / std


@torch.no_grad()
def patch_tokens(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """L2-normalised patch tokens (n * 64, D) of whole composites."""
    x = _tensor(images)
    out = [model.forward_features(x[i:i + 128])["x_norm_patchtokens"] for i in range(0, len(x), 128)]
    return F.normalize(torch.cat(out).flatten(0, 1).float(), dim=1)


def segment(bank: torch.Tensor, bank_labels: np.ndarray, test: torch.Tensor, k: int = 20) -> np.ndarray:
    """Majority label of the ``k`` nearest (cosine) bank patches of every test patch."""
    labels = torch.as_tensor(bank_labels.reshape(-1))
    pred = []
    for chunk in test.split(2048):
        idx = (chunk @ bank.T).topk(k, dim=1).indices
        votes = F.one_hot(labels[idx], BACKGROUND + 1).sum(1)
        pred.append(votes.argmax(1))
    return torch.cat(pred).numpy()


def scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Patch accuracy, mean IoU over the labels present, foreground accuracy (in %)."""
    truth = truth.reshape(-1)
    ious = []
    for c in range(BACKGROUND + 1):
        union = np.sum((pred == c) | (truth == c))
        if union:
            ious.append(np.sum((pred == c) & (truth == c)) / union)
    fg = truth != BACKGROUND
    return {"patch_acc": 100 * float(np.mean(pred == truth)), "miou": 100 * float(np.mean(ious)),
            "fg_acc": 100 * float(np.mean(pred[fg] == truth[fg]))}


def evaluate(model: torch.nn.Module, data: dict[str, np.ndarray]) -> dict[str, float]:
    model.eval()
    pred = segment(patch_tokens(model, data["bank_x"]), data["bank_y"], patch_tokens(model, data["test_x"]))
    return scores(pred, data["test_y"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="bench_out/gram_dense")
    ap.add_argument("--n-train", type=int, default=20000, help="training composites")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bank", type=int, default=1000, help="bank composites (x 64 patches)")
    ap.add_argument("--test", type=int, default=300, help="test composites (x 64 patches)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    (work / "data").mkdir(parents=True, exist_ok=True)
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    half = len(xtr) // 2
    shard0 = work / "data" / f"train{args.n_train}-000000.tar"
    if not shard0.exists():
        x, y = composites(xtr[:half], ytr[:half], args.n_train, seed=0)
        write_shards(x, y.max(1), str(work / "data" / f"train{args.n_train}-%06d.tar"), maxcount=2000)
    urls = str(work / "data" / f"train{args.n_train}-{{000000..{(args.n_train + 1999) // 2000 - 1:06d}}}.tar")
    bank_x, bank_y = composites(xtr[half:], ytr[half:], args.bank, seed=1)
    test_x, test_y = composites(xte, yte, args.test, seed=2)
    data = {"bank_x": bank_x, "bank_y": bank_y, "test_x": test_x, "test_y": test_y}
    steps = args.steps - args.steps % 6
    common = [f'data.shards.urls=["{urls}"]', f"data.shards.batch_size={args.batch}", "data.shards.num_workers=1",
              "data.shards.shuffle_buffer=1000", f"schedule.epoch_length={steps // 6}", "schedule.epochs=6",
              'train.precision="fp32"', "train.tensorboard=false", f"train.checkpoint_every={steps}", "phases=[]"]
    gram = ["loss.gram_weight=1.0", f"loss.gram_start={steps // 2}", f"loss.gram_refresh_every={max(1, steps // 6)}"]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    rows = {"random init": evaluate(build_backbone("vit_mini", patch_size=7, img_size=56, init_values=0), data)}
    for name, sets in (("DINOv2 (no Gram)", common), ("DINOv2 + Gram anchoring", common + gram)):
        out = work / ("gram" if "Gram anchoring" in name else "plain")
        _run("train", TINY, out, sets)
        rows[name] = evaluate(build_backbone(None, weights=str(out / "export" / "teacher.pth")), data)
    print(f"\n{'backbone':<26} {'patch acc':>9} {'mIoU':>6} {'fg acc':>7}")
    for name, r in rows.items():
        print(f"{name:<26} {r['patch_acc']:9.2f} {r['miou']:6.2f} {r['fg_acc']:7.2f}")
    result = {"bench": "gram_dense", "steps": steps, "batch": args.batch, "seconds": round(time.perf_counter() - t0, 1),
              **{k: {kk: round(v, 2) for kk, v in r.items()} for k, r in rows.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
