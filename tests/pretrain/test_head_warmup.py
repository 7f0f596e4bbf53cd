"""Continued pretraining from a released backbone (issue 17): the head warm-up trains only the fresh heads until the
targets are informative (or ``max_iters``), then the backbone trains with its own lr warm-up; resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.methods.head_warmup import HeadWarmupConfig
from pretrain.models import build_backbone, export_backbone
from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .test_train import _shard_batch, _synthetic_batches
from .trainer_utils import tiny_overrides, write_shards

RECIPE = str(Path(__file__).resolve().parents[2] / "pretrain" / "recipes" / "tiny_cpu.toml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A backbone-only file, as DINOv2 releases them (no heads)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("released") / "backbone.pth"
    export_backbone(build_backbone("vit_test", patch_size=7, img_size=28).state_dict(), str(path), name="vit_test")
    return str(path)


def _trainer(tmp: Path, urls: str, released: str, **warm) -> Trainer:
    sets = tiny_overrides(urls, **{"backbone.weights": f'"{released}"', **{f"head_warmup.{k}": str(v)
                                                                          for k, v in warm.items()}})  # fmt: skip
    return Trainer(load_config(TrainConfig, RECIPE, sets), tmp)


def _backbone(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module["backbone"].state_dict().items()}


def test_heads_train_alone_until_max_iters_then_the_backbone_warms_up(tmp_path, shards, released):
    tr = _trainer(tmp_path, shards, released, max_iters=3, min_iters=1, max_entropy=1e-4, backbone_warmup_iters=2)
    arch, phase = tr.method.arch, tr.phases[0]
    file = torch.load(released, weights_only=True)
    start = _backbone(arch.student)
    assert all(torch.equal(start[k], file[k]) for k in file)  # student (and teacher) start from the released file
    heads0 = {k: v.clone() for k, v in arch.student["dino_head"].state_dict().items()}
    frozen, factors = [], []
    for step, batch in enumerate(_synthetic_batches(5)):
        m = tr.train_step(_shard_batch(batch, 0, 1), step, phase)
        frozen.append(m["backbone_frozen"])
        factors.append([g["lr"] / max(m["lr"] * g["lr_multiplier"], 1e-30) for g in tr.optimizer.param_groups
                        if g.get("is_backbone")][0])  # fmt: skip
        if step == 2:  # the last head-only step: backbone untouched, heads trained, teacher still the file
            assert all(torch.equal(v, start[k]) for k, v in _backbone(arch.student).items())
            assert any(not torch.equal(v, heads0[k]) for k, v in arch.student["dino_head"].state_dict().items())
            teacher = _backbone(arch.teacher)
            assert all(torch.allclose(teacher[k], file[k], atol=1e-6) for k in file)
    assert frozen == [1.0, 1.0, 1.0, 0.0, 0.0] and int(arch.backbone_unfrozen_at) == 3
    assert factors == [0.0, 0.0, 0.0, pytest.approx(0.5), pytest.approx(1.0)]
    assert any(not torch.equal(v, start[k]) for k, v in _backbone(arch.student).items())


def test_informative_targets_end_the_warmup_early():
    cfg = HeadWarmupConfig(max_iters=100, min_iters=2, max_entropy=0.9, min_agreement=0.5)
    assert not cfg.informative(0, 0.1, 0.9)  # before min_iters
    assert cfg.informative(1, 0.9, 0.5) and not cfg.informative(1, 0.95, 0.9) and not cfg.informative(1, 0.5, 0.4)
    assert cfg.informative(99, 1.0, 0.0)  # max_iters reached whatever the targets
    assert cfg.backbone_factor(5, -1) == 0.0 and cfg.backbone_factor(2, 3) == 0.0
    with pytest.raises(ValueError, match="min_iters"):
        HeadWarmupConfig(max_iters=5, min_iters=10)


def test_resume_across_the_unfreeze_is_bitwise(tmp_path, shards, released):
    def run(out: Path, **extra) -> list[dict]:
        sets = tiny_overrides(shards, **{"backbone.weights": f'"{released}"', "head_warmup.max_iters": "3",
                                         "head_warmup.min_iters": "2", "head_warmup.max_entropy": "1.0",
                                         "head_warmup.min_agreement": "0.0", **extra})  # fmt: skip
        main([RECIPE, "--out", str(out), *[a for kv in sets for a in ("--set", kv)]])
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "a")
    run(tmp_path / "b", **{"train.stop_at": 2})  # stopped exactly at the unfreeze
    resumed = run(tmp_path / "b")
    assert [m["backbone_frozen"] for m in straight] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # informative after 2
    for x, y in zip(straight, resumed):
        assert x["loss"] == y["loss"] and x["backbone_frozen"] == y["backbone_frozen"], x["step"]
