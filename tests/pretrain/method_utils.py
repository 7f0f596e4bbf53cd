"""Shared helpers of the per-method tests: seconds-long run overrides, metrics, per-rank slices of a batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: overrides that make any tiny method recipe a seconds-long run (batch 4, 6 steps, a checkpoint every 2)
FAST = {"data.shards.batch_size": "4", "data.shards.num_workers": "0", "data.shards.shuffle_buffer": "8",
        "schedule.epoch_length": "2", "schedule.epochs": "3", "schedule.warmup_epochs": "0",
        "schedule.lr_reference_batch": "4", "train.log_every": "1", "train.monitor_every": "2",
        "train.checkpoint_every": "2", "train.tensorboard": "false"}


def fast_sets(urls: str, *layers: dict[str, Any], **extra: object) -> list[str]:
    """``--set`` values: the shards ``urls``, :data:`FAST`, then each of ``layers``, then ``extra`` (later wins)."""
    sets: dict[str, Any] = {"data.shards.urls": f'["{urls}"]', **FAST}
    for layer in layers:
        sets.update(layer)
    sets.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in sets.items()]


def read_metrics(out: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def slice_views(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Rank ``rank``'s share of a global batch: every ``*_crops`` tensor is crop-major (``x[c * B + b]``) and sliced
    per crop; every other entry (keys, set indices) is per sample."""
    b = batch["global_crops"].shape[0] // 2
    per = b // world
    sl = slice(rank * per, (rank + 1) * per)
    out: dict[str, Any] = {}
    for key, x in batch.items():
        if key.endswith("_crops"):
            assert isinstance(x, torch.Tensor)
            crops = x.reshape(x.shape[0] // b, b, *x.shape[1:])
            out[key] = crops[:, sl].reshape(-1, *x.shape[1:])
        else:
            out[key] = x[sl]
    return out
