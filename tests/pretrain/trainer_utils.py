"""Helpers for trainer tests: tiny WebDataset shards of real Fashion-MNIST images and a tiny recipe."""

from __future__ import annotations

import io
from pathlib import Path

import webdataset as wds
from PIL import Image

from pretrain.eval.fashion_mnist import load_fashion_mnist


def write_shards(out: Path, n: int = 96, per_shard: int = 32) -> str:
    """Write ``n`` Fashion-MNIST images (JPEG, upscaled to 56 px) as shards; returns the brace URL pattern."""
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_fashion_mnist("train", n, balanced=False)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, (img, lab) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(img).convert("RGB").resize((56, 56), Image.BICUBIC).save(buf, "JPEG", quality=90)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": int(lab)})
    last = (n + per_shard - 1) // per_shard - 1
    return str(out / f"shard-{{000000..{last:06d}}}.tar")


def tiny_overrides(urls: str, **extra: object) -> list[str]:
    """``--set`` overrides turning tiny_cpu.toml into a seconds-long fp32 test run."""
    sets = {
        "data.shards.urls": f'["{urls}"]', "data.shards.batch_size": "4", "data.shards.num_workers": "0",
        "data.shards.shuffle_buffer": "8", "backbone.name": '"vit_test"',
        "backbone.overrides": "{patch_size = 7, img_size = 28}", "backbone.drop_path_rate": "0.1",
        "data.crops.global_size": "28", "data.crops.local_size": "14", "data.crops.n_local": "2",
        "heads.out_dim": "64", "heads.hidden_dim": "32", "heads.bottleneck_dim": "16",
        "schedule.epoch_length": "2", "schedule.epochs": "3", "schedule.warmup_epochs": "1",
        "schedule.freeze_last_layer_epochs": "0.5", "schedule.warmup_teacher_temp_epochs": "1",
        "schedule.lr_reference_batch": "1024", "schedule.teacher_temp": "0.07", "schedule.warmup_teacher_temp": "0.04",
        "train.precision": '"fp32"', "train.log_every": "1", "train.monitor_every": "2",
        "train.checkpoint_every": "2", "train.tensorboard": "false", "phases": "[]",
    }
    sets.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in sets.items()]
