"""Training metrics: ``metrics.jsonl`` (always), TensorBoard (optional), a rank-0 progress line, FLOPs and MFU."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("pretrain")

#: Dense bf16 peak FLOP/s per GPU, for MFU (H100/H200 SXM ~989 TFLOP/s; A100 312 TFLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def vit_forward_flops(embed_dim: int, depth: int, mlp_hidden: int, n_tokens: int, swiglu: bool = False) -> float:
    """Matmul FLOPs of one ViT forward on one image with ``n_tokens`` tokens (2 FLOPs per multiply-add)."""
    d, n = embed_dim, n_tokens
    attn_proj = 2 * n * d * 3 * d + 2 * n * d * d  # qkv + proj
    attn_scores = 2 * 2 * n * n * d  # q k^T and attn v
    mlp = 2 * n * d * mlp_hidden * (3 if swiglu else 2)
    return depth * (attn_proj + attn_scores + mlp)


def peak_flops(device: torch.device) -> float | None:
    """Vendor dense bf16 peak of this GPU, or None (CPU / unknown GPU: no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or this process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsLogger:
    """Writes one JSON object per logged step; rank 0 only (other ranks get a no-op logger)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except Exception as exc:  # tensorboard is optional at run time
                logger.warning("TensorBoard disabled: %s", exc)
        self._last = time.perf_counter()

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def progress(self, step: int, total: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        keys = ("loss", "dino", "ibot", "koleo", "lr", "teacher_temp", "img_per_s", "mfu")
        shown = " ".join(f"{k}={values[k]:.4g}" for k in keys if k in values and values[k] is not None)
        logger.info("step %d/%d %s", step, total, shown)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
