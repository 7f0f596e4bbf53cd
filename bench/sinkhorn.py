"""Sinkhorn-Knopp teacher targets: the scaling form in ``pretrain.losses.sinkhorn`` against a log-domain form.

Both compute the same DINOv2 iterations (3 by default) on cosine-like logits (as the heads give) at teacher
temperature ``--temp``; the log-domain form (``logsumexp`` per row and column step, what dinoforge used before)
is written here as the baseline. For each (samples x prototypes) shape it prints the median wall time of
``--runs`` calls of each, their ratio, and the largest absolute difference of the two outputs (float32).
Shapes: DINO CLS targets and iBOT patch targets of the tiny CPU recipes (batch 64: 128 CLS / 8192 patch tokens,
1024 prototypes) and a larger per-GPU-like shape. Single process, ``--threads`` torch threads.

    .venv/bin/python bench/sinkhorn.py [--runs 7] [--threads 1] [--temp 0.02] [--shapes 128x1024 8192x1024 ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from pretrain.losses import sinkhorn_knopp


@torch.no_grad()
def log_domain(logits: torch.Tensor, temp: float, n_iters: int = 3) -> torch.Tensor:
    """Baseline: the iterations on log Q (samples as columns), one ``logsumexp`` per normalisation."""
    b, k = logits.shape
    log_q = (logits.float() / temp).t()
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), 0)
    for _ in range(n_iters):
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - math.log(b)
    return (log_q + math.log(b)).exp().t().contiguous()


def head_like_logits(b: int, k: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Cosine similarities of normalised features and prototypes, as the DINO / iBOT heads' last layer gives."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1)
    protos = torch.nn.functional.normalize(torch.randn(dim, k, generator=g), dim=0)
    return feats @ protos


def median_seconds(fn, logits: torch.Tensor, temp: float, runs: int) -> float:
    fn(logits, temp)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(logits, temp)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--temp", type=float, default=0.02)
    p.add_argument("--shapes", nargs="+", default=["128x1024", "8192x1024", "2048x65536"], metavar="BxK")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"Sinkhorn-Knopp, 3 iterations, temp {args.temp}, float32, {args.threads} thread(s), "
          f"median of {args.runs} runs")
    print(f"{'samples x prototypes':>22} {'log-domain ms':>14} {'scaling form ms':>16} {'speed-up':>9} "
          f"{'max |diff|':>11}")
    for shape in args.shapes:
        b, k = (int(v) for v in shape.split("x"))
        logits = head_like_logits(b, k)
        base = median_seconds(log_domain, logits, args.temp, args.runs)
        fast = median_seconds(sinkhorn_knopp, logits, args.temp, args.runs)
        diff = (log_domain(logits, args.temp) - sinkhorn_knopp(logits, args.temp)).abs().max().item()
        print(f"{shape:>22} {base * 1e3:14.2f} {fast * 1e3:16.2f} {base / fast:8.1f}x {diff:11.2e}", flush=True)


if __name__ == "__main__":
    main()
