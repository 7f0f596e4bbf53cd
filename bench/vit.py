"""ViT throughput and peak memory: forward and forward+backward, fp32 and bf16 autocast, per attention backend,
and packed multi-crop (2 global + 8 local crops in one forward) vs separate forwards.

    python bench/vit.py                                  # vits14 + vitb14, batch 32, 224 px, everything
    python bench/vit.py --models vits14 --passes fwd --iters 5
    python bench/vit.py --models vitl14 vitg14 --device cuda   # on a GPU, xformers joins the backends

Each configuration runs in a fresh process on CPU so its peak RSS is its own; on CUDA the peak is
``torch.cuda.max_memory_allocated``. Throughput is the median over ``--iters`` timed iterations after warm-up.
Multi-crop rows count images as source images (each with 2 global + 8 local crops).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _measure(spec: dict) -> dict:
    import torch

    from pretrain.models import build_backbone

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_backbone(spec["model"], attn_backend=spec["backend"]).to(device)
    train = spec["pass"] == "fwdbwd"
    model.train(train)
    b = spec["batch"]
    if spec["layout"] == "single":
        inputs = [torch.randn(b, 3, 224, 224, device=device)]
    else:
        inputs = [torch.randn(2 * b, 3, 224, 224, device=device), torch.randn(8 * b, 3, 98, 98, device=device)]
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else None

    def step() -> None:
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
        with ctx, torch.set_grad_enabled(train):
            if spec["layout"] == "separate":
                outs = [model.forward_features(x) for x in inputs]
            else:
                outs = model.forward_features_list(inputs)
            if train:
                loss = sum(o["x_norm_clstoken"].float().square().mean() for o in outs)
                loss.backward()
                model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["iters"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = statistics.median(times)
    return {**spec, "s_per_iter": med, "img_per_s": b / med, "peak_mb": peak_mb,
            "min_img_per_s": b / max(times), "max_img_per_s": b / min(times)}


def _run_isolated(spec: dict) -> dict:
    if spec["device"] == "cuda":
        return _measure(spec)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_measure, (spec,))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vits14", "vitb14"])
    p.add_argument("--batch", type=int, default=32, help="images per step (single) or source images (multi-crop)")
    p.add_argument("--mc-batch", type=int, default=None, help="source images for multi-crop rows (default: batch)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--backends", nargs="+", default=None, help="default: sdpa math (+ xformers on CUDA)")
    p.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--layouts", nargs="+", default=["single", "packed", "separate"],
                   choices=["single", "packed", "separate"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    backends = args.backends or (["xformers", "sdpa", "math"] if device == "cuda" else ["sdpa", "math"])
    rows = []
    header = f"{'model':8} {'layout':8} {'backend':8} {'prec':5} {'pass':6} {'img/s':>8} {'range':>15} {'peak MB':>9}"
    print(f"device={device} torch={torch.__version__} threads={args.threads or torch.get_num_threads()}")
    print(header)
    print("-" * len(header))
    for model in args.models:
        for layout in args.layouts:
            for backend in backends:
                for precision in args.precisions:
                    for pss in args.passes:
                        batch = args.batch if layout == "single" else (args.mc_batch or args.batch)
                        spec = {"model": model, "layout": layout, "backend": backend, "precision": precision,
                                "pass": pss, "batch": batch, "iters": args.iters, "warmup": args.warmup,
                                "threads": args.threads, "device": device}
                        try:
                            r = _run_isolated(spec)
                        except Exception as exc:  # report and continue: one bad combination must not hide the rest
                            print(f"{model:8} {layout:8} {backend:8} {precision:5} {pss:6} failed: {exc}")
                            continue
                        rows.append(r)
                        rng = f"{r['min_img_per_s']:.1f}-{r['max_img_per_s']:.1f}"
                        print(f"{model:8} {layout:8} {backend:8} {precision:5} {pss:6} {r['img_per_s']:8.1f} "
                              f"{rng:>15} {r['peak_mb']:9.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
