"""Schedules at key iterations, param-group assignment, schedule application, per-module clipping, configs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.models.heads import DINOHead
from pretrain.optim import (
    OptimConfig,
    ScheduleConfig,
    Schedules,
    apply_schedules,
    build_optimizer,
    build_param_groups,
    clip_grad_per_module,
    cosine_schedule,
    param_table,
)
from pretrain.utils.config import build


def _official_array(base, final, total, warmup=0, start=0.0, freeze=0):
    """DINOv2 CosineScheduler's precomputed array, rebuilt with numpy."""
    iters = np.arange(total - warmup - freeze)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters))) if len(iters) else np.zeros(0)
    return np.concatenate((np.zeros(freeze), np.linspace(start, base, warmup), cos))


@pytest.mark.parametrize("kw", [
    dict(base=1.0, final=0.1, total=50, warmup=10),
    dict(base=2.0, final=0.0, total=40, warmup=5, freeze=7),
    dict(base=0.07, final=0.07, total=30, warmup=30, start=0.04),
    dict(base=0.04, final=0.4, total=20),
])
def test_cosine_schedule_matches_official_array(kw):
    array = _official_array(**kw)
    for step in range(kw["total"] + 5):
        expected = array[step] if step < kw["total"] else kw["final"]
        assert cosine_schedule(step, **kw) == pytest.approx(expected, abs=1e-12)


def test_schedules_at_key_iterations():
    cfg = ScheduleConfig(epoch_length=10, epochs=100, warmup_epochs=10, warmup_teacher_temp_epochs=30)
    s = Schedules(cfg, global_batch_size=4096)
    peak = 0.004 * math.sqrt(4096 / 1024)
    assert s.peak_lr == pytest.approx(peak)
    v0 = s.at(0)
    assert (v0.lr, v0.last_layer_lr, v0.teacher_temp) == (0.0, 0.0, pytest.approx(0.04))
    assert v0.weight_decay == pytest.approx(0.04) and v0.momentum == pytest.approx(0.992)
    assert s.at(99).lr == pytest.approx(peak) and s.at(100).lr == pytest.approx(peak)  # end of warm-up
    # frozen for the first epoch, then its own warm-up from 0 (the reference shifts it by the freeze)
    assert s.at(9).last_layer_lr == 0.0 and s.at(10).last_layer_lr == 0.0 and s.at(11).last_layer_lr > 0
    assert s.at(150).teacher_temp == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert s.at(299).teacher_temp == pytest.approx(0.07) and s.at(5000).teacher_temp == pytest.approx(0.07)
    mid = s.at(550)  # halfway through the cosine part
    assert mid.lr == pytest.approx(1e-6 + 0.5 * (peak - 1e-6))
    assert s.at(500).weight_decay == pytest.approx(0.22) and s.at(500).momentum == pytest.approx(0.996)
    end = s.at(1000)
    assert (end.lr, end.weight_decay, end.momentum) == (pytest.approx(1e-6), pytest.approx(0.4), 1.0)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(d))


class _Backbone(nn.Module):
    def __init__(self, d=8, depth=3):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)


def test_param_groups_assignment():
    student = nn.ModuleDict({"backbone": _Backbone(), "dino_head": DINOHead(8, 10, 6, 4)})
    student.backbone.norm.bias.requires_grad_(False)
    rows = {r["name"]: r for r in param_table(student, layerwise_decay=0.5, patch_embed_lr_mult=0.2)}
    assert "backbone.norm.bias" not in rows  # frozen parameters are skipped
    expected = {  # name: (lr_multiplier, wd_multiplier, is_last_layer); L = 3 blocks -> rate ** (4 - layer)
        "backbone.patch_embed.proj.weight": (0.5**4 * 0.2, 1.0, False),
        "backbone.patch_embed.proj.bias": (0.5**4 * 0.2, 0.0, False),
        "backbone.cls_token": (0.5**4, 1.0, False),
        "backbone.pos_embed": (0.5**4, 1.0, False),
        "backbone.mask_token": (0.5**4, 1.0, False),
        "backbone.blocks.0.norm1.weight": (0.5**3, 0.0, False),
        "backbone.blocks.0.attn.qkv.weight": (0.5**3, 1.0, False),
        "backbone.blocks.0.attn.qkv.bias": (0.5**3, 0.0, False),
        "backbone.blocks.2.ls1.gamma": (0.5, 0.0, False),
        "backbone.blocks.2.attn.qkv.weight": (0.5, 1.0, False),
        "backbone.norm.weight": (1.0, 0.0, False),
        "dino_head.mlp.0.weight": (1.0, 1.0, False),
        "dino_head.mlp.4.bias": (1.0, 0.0, False),
        "dino_head.last_layer.weight_g": (1.0, 1.0, True),
        "dino_head.last_layer.weight_v": (1.0, 1.0, True),
    }
    for name, (lr_mult, wd_mult, last) in expected.items():
        row = rows[name]
        assert (row["lr_multiplier"], row["wd_multiplier"], row["is_last_layer"]) == (pytest.approx(lr_mult), wd_mult,
                                                                                     last), name
    groups = build_param_groups(student, OptimConfig(layerwise_decay=0.5))
    assert sum(len(g["params"]) for g in groups) == len(rows)
    assert len({(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups}) == len(groups)
    # wrapper prefixes (activation checkpointing / compile) do not change the assignment
    wrapped = nn.Module()
    wrapped._orig_mod = nn.ModuleDict({"backbone": _Backbone()})
    names = {r["name"] for r in param_table(wrapped, n_blocks=3)}
    assert "backbone.blocks.1.attn.qkv.weight" in names


def test_apply_schedules_and_frozen_last_layer_step():
    torch.manual_seed(0)
    student = nn.ModuleDict({"backbone": _Backbone(), "dino_head": DINOHead(8, 10, 6, 4)})
    opt = build_optimizer(build_param_groups(student), OptimConfig())
    s = Schedules(ScheduleConfig(epoch_length=5, epochs=10, warmup_epochs=1), global_batch_size=1024)
    values = s.at(3)
    apply_schedules(opt, values)
    for g in opt.param_groups:
        base = values.last_layer_lr if g["is_last_layer"] else values.lr
        assert g["lr"] == pytest.approx(base * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(values.weight_decay * g["wd_multiplier"])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(4, 8)
    student.dino_head(x).pow(2).sum().backward()
    opt.step()
    after = student.state_dict()
    assert torch.equal(after["dino_head.last_layer.weight_v"], before["dino_head.last_layer.weight_v"])
    assert not torch.equal(after["dino_head.mlp.0.weight"], before["dino_head.mlp.0.weight"])


def test_clip_grad_per_module():
    a, b, c = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(2, 2)
    a.weight.grad = torch.full((4, 4), 3.0)  # norm 12
    b.weight.grad = torch.full((4, 4), 0.1)  # norm 0.4
    norms = clip_grad_per_module({"backbone": a, "dino_head": b, "ibot_head": c}, max_norm=3.0)
    assert norms == {"backbone": pytest.approx(12.0), "dino_head": pytest.approx(0.4), "ibot_head": 0.0}
    assert a.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    assert b.weight.grad.norm().item() == pytest.approx(0.4)  # below the limit: untouched
    b.weight.grad[0, 0] = float("nan")
    a.weight.grad = torch.full((4, 4), 3.0)
    norms = clip_grad_per_module({"backbone": a, "dino_head": b}, max_norm=3.0)
    assert math.isnan(norms["dino_head"]) and torch.isnan(b.weight.grad[0, 0])
    assert b.weight.grad[1, 1].item() == pytest.approx(0.1)  # a non-finite module is not rescaled
    a.weight.grad = torch.full((4, 4), 3.0)
    measured = clip_grad_per_module([("backbone", a)], max_norm=0.0)
    assert measured["backbone"] == pytest.approx(12.0) and a.weight.grad.norm().item() == pytest.approx(12.0)


def test_configs_validate_and_load_from_dict():
    cfg = build(ScheduleConfig, {"epochs": 20, "epoch_length": 100, "base_lr": 1e-3})
    assert cfg.total_iters == 2000 and cfg.warmup_iters == 1000
    with pytest.raises(ValueError, match="schedule.epoch_length"):
        ScheduleConfig(epoch_length=0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        ScheduleConfig(epochs=5, warmup_epochs=5)
    with pytest.raises(ValueError, match="momentum_teacher"):
        ScheduleConfig(momentum_teacher=1.5)
    with pytest.raises(ValueError, match="optim.layerwise_decay"):
        OptimConfig(layerwise_decay=0.0)
    with pytest.raises(ValueError, match="optim.betas"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="global_batch_size"):
        Schedules(ScheduleConfig(), 0)


def test_param_groups_on_the_real_backbone():
    from pretrain.models import build_backbone

    backbone = build_backbone("vit_test")
    student = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(backbone.embed_dim, 16, 8, 4)})
    rows = {r["name"]: r for r in param_table(student, layerwise_decay=0.9)}
    assert len(rows) == sum(1 for p in student.parameters() if p.requires_grad)
    n = backbone.n_blocks
    assert rows["backbone.pos_embed"]["lr_multiplier"] == pytest.approx(0.9 ** (n + 1))
    assert rows["backbone.pos_embed"]["wd_multiplier"] == 1.0
    assert rows["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.9 ** (n + 1) * 0.2)
    last = n - 1
    assert rows[f"backbone.blocks.{last}.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert rows[f"backbone.blocks.{last}.ls1.gamma"]["wd_multiplier"] == 0.0
    assert rows["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert [name for name, r in rows.items() if r["is_last_layer"]] == ["dino_head.last_layer.weight_g",
                                                                        "dino_head.last_layer.weight_v"]
