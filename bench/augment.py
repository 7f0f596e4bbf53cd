"""Multi-crop augmentation throughput per core: JPEG decode (draft mode) + 2 global + N local crops + to-tensor.

Single process, one torch thread. Prints samples/s (median and best of several runs) for an ImageNet-sized
JPEG (about 500x375, quality 90, cut from a real photo) and for a 2560x1600 photo.

    .venv/bin/python bench/augment.py [--runs 5] [--n 60] [--global-size 224] [--local-size 98] [--n-local 8]
"""

from __future__ import annotations

import argparse
import glob
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image

from pretrain.data.augment import MultiCropAugment, MultiCropConfig, decode_for_crops

NATURE = "/usr/share/backgrounds/mate/nature"


def imagenet_like_jpegs(count: int = 8) -> list[bytes]:
    """ImageNet-sized q90 JPEGs: 500x375 cuts (resized) from the real nature photos and skimage samples."""
    from skimage import data

    sources = [Image.open(p).convert("RGB") for p in sorted(glob.glob(f"{NATURE}/*.jpg"))[:count]]
    if len(sources) < count:
        sources += [Image.fromarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    out = []
    for img in sources[:count]:
        small = img.resize((500, 375) if img.width >= img.height else (375, 500), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run(jpegs: list[bytes], aug: MultiCropAugment, n: int, seed: int) -> float:
    """Augment ``n`` samples (cycling over ``jpegs``) and return samples/s."""
    min_side = aug.cfg.min_decode_side
    t0 = time.perf_counter()
    for i in range(n):
        img = decode_for_crops(jpegs[i % len(jpegs)], min_side)
        out = aug(img, np.random.default_rng([seed, i]))
        assert len(out["local"]) == aug.cfg.n_local
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per input (median and best reported)")
    parser.add_argument("--n", type=int, default=60, help="samples per run")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--n-local", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = MultiCropConfig(global_size=args.global_size, local_size=args.local_size, n_local=args.n_local)
    aug = MultiCropAugment(cfg)
    with open(f"{NATURE}/LadyBird.jpg", "rb") as f:
        big = f.read()
    inputs = {"imagenet-like 500x375 q90": imagenet_like_jpegs(), "2560x1600 photo (LadyBird)": [big]}
    print(f"multi-crop 2x{cfg.global_size} + {cfg.n_local}x{cfg.local_size}, decode draft >= {cfg.min_decode_side}px,"
          f" 1 process, torch threads 1, {args.runs} runs x {args.n} samples")
    for name, jpegs in inputs.items():
        run(jpegs, aug, 5, seed=123)  # warm-up
        rates = [run(jpegs, aug, args.n, seed=r) for r in range(args.runs)]
        print(f"{name:30s} median {statistics.median(rates):6.1f} samples/s   best {max(rates):6.1f}   "
              f"({1000 / statistics.median(rates):.1f} ms/sample)")


if __name__ == "__main__":
    main()
