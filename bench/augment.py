"""Multi-crop augmentation throughput per core: JPEG decode (draft mode) + 2 global + N local crops + to-tensor.

Single process, one torch thread. Prints samples/s (median and best of several runs) for ImageNet-sized JPEGs
(500x375, quality 90, resized from real photos) and for a 2560x1600 photo, both by wall clock and by this
process's CPU time (the fairer figure on a shared machine). A calibration line (decode of one ImageNet-sized
JPEG) shows how fast the core is right now; the load average shows how busy the machine is.

    .venv/bin/python bench/augment.py [--runs 5] [--n 60] [--global-size 224] [--local-size 98] [--n-local 8]
                                      [--loader-workers 0 2]

With ``--loader-workers``, it also times the whole ``WdsLoader`` (tar reading, decode, multi-crop, masks,
collate; batches of 32) over temporary WebDataset shards of the ImageNet-sized JPEGs, per worker count.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
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


def run(jpegs: list[bytes], aug: MultiCropAugment, n: int, seed: int) -> tuple[float, float]:
    """Augment ``n`` samples (cycling over ``jpegs``); return samples/s by wall clock and by CPU time."""
    min_side = aug.cfg.min_decode_side
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        img = decode_for_crops(jpegs[i % len(jpegs)], min_side)
        out = aug(img, np.random.default_rng([seed, i]))
        assert len(out["local"]) == aug.cfg.n_local
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def calibration_ms(jpeg: bytes, repeats: int = 200) -> tuple[float, float]:
    """Best-of-3 mean decode time of one JPEG in ms, by wall clock and by CPU time."""
    wall = cpu = float("inf")
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            Image.open(io.BytesIO(jpeg)).convert("RGB")
        wall = min(wall, (time.perf_counter() - t0) / repeats)
        cpu = min(cpu, (time.process_time() - c0) / repeats)
    return wall * 1e3, cpu * 1e3


def loader_rate(jpegs: list[bytes], cfg: MultiCropConfig, workers: int, batches: int = 6) -> float:
    """Samples/s of ``WdsLoader`` (after its first batch) over temporary shards of ``jpegs``."""
    import tempfile

    import webdataset as wds

    from pretrain.data.loader import WdsLoader
    from pretrain.data.wds import WdsConfig

    with tempfile.TemporaryDirectory() as tmp:
        with wds.ShardWriter(f"{tmp}/bench-%06d.tar", maxcount=64, verbose=0) as sink:
            for i in range(256):
                sink.write({"__key__": f"{i:06d}", "jpg": jpegs[i % len(jpegs)]})
        wcfg = WdsConfig(urls=[f"{tmp}/bench-{{000000..000003}}.tar"], batch_size=32, num_workers=workers,
                         shuffle_buffer=64)
        it = iter(WdsLoader(wcfg, cfg, patch_size=14))
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * 32 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per input (median and best reported)")
    parser.add_argument("--n", type=int, default=60, help="samples per run")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--loader-workers", type=int, nargs="*", default=[],
                        help="also time WdsLoader end to end with these worker counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = MultiCropConfig(global_size=args.global_size, local_size=args.local_size, n_local=args.n_local)
    aug = MultiCropAugment(cfg)
    with open(f"{NATURE}/LadyBird.jpg", "rb") as f:
        big = f.read()
    inputs = {"imagenet-like 500x375 q90": imagenet_like_jpegs(), "2560x1600 photo (LadyBird)": [big]}
    print(f"multi-crop 2x{cfg.global_size} + {cfg.n_local}x{cfg.local_size}, decode draft >= {cfg.min_decode_side}px,"
          f" 1 process, torch threads 1, {args.runs} runs x {args.n} samples")
    wall_ms, cpu_ms = calibration_ms(inputs["imagenet-like 500x375 q90"][0])
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; calibration: decode of one 500x375 q90 "
          f"JPEG {wall_ms:.2f} ms wall, {cpu_ms:.2f} ms CPU")
    for name, jpegs in inputs.items():
        run(jpegs, aug, 5, seed=123)  # warm-up
        rates = [run(jpegs, aug, args.n, seed=r) for r in range(args.runs)]
        wall, cpu = [r[0] for r in rates], [r[1] for r in rates]
        print(f"{name:28s} wall: median {statistics.median(wall):6.1f} best {max(wall):6.1f} samples/s | "
              f"CPU time: median {statistics.median(cpu):6.1f} best {max(cpu):6.1f} samples/s per core "
              f"({1000 / statistics.median(cpu):.1f} ms/sample)")
    for workers in args.loader_workers:
        rate = loader_rate(inputs["imagenet-like 500x375 q90"], cfg, workers)
        print(f"WdsLoader, {workers} workers, batch 32, imagenet-like: {rate:6.1f} samples/s (wall)")


if __name__ == "__main__":
    main()
