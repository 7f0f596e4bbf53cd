"""Sharding plan dry run on a fake process group: units, per-rank shards, no leftover process group."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from pretrain.models import build_backbone
from pretrain.models.heads import DINOHead
from pretrain.parallel.plan import main, plan_sharding


def _student() -> nn.Module:
    return nn.ModuleDict({"backbone": build_backbone("vit_test"), "dino_head": DINOHead(32, 64, 48, 16)})


def test_plan_lists_units_and_splits_every_parameter_over_the_ranks():
    total = sum(p.numel() for p in _student().parameters())
    plans = [plan_sharding(_student, world_size=4, rank=r) for r in range(4)]
    assert not dist.is_initialized()
    for plan in plans:
        assert [(u.name, u.compute_dtype) for u in plan.units] == [
            ("backbone", "bfloat16"), ("backbone.blocks.0", "bfloat16"), ("backbone.blocks.1", "bfloat16"),
            ("dino_head", "float32"),
        ]
        assert plan.numel == total
    assert sum(p.local_numel for p in plans) == total
    # FSDP2 shards dim 0 in torch.chunk pieces: rank r holds rows [r * ceil(d0/4), (r + 1) * ceil(d0/4))
    for rank, plan in enumerate(plans):
        expected = 0
        for p in _student().parameters():
            chunk = -(-p.shape[0] // 4)
            expected += max(0, min(chunk, p.shape[0] - rank * chunk)) * (p.numel() // p.shape[0])
        assert plan.local_numel == expected
    assert plans[3].train_state_bytes() == 16 * plans[3].local_numel
    fp32_plan = plan_sharding(_student, world_size=2, mp_policy="fp32")
    assert {u.compute_dtype for u in fp32_plan.units} == {"float32"}


def test_plan_cli_prints_collapsed_blocks(capsys):
    assert main(["--backbone", "vit_test", "--world-size", "8", "--rank", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rank 7 of 8:")
    assert "blocks.[0-1]" in out and "2 x" in out and "sharded train state" in out
    assert main(["pretrain/recipes/tiny_cpu.toml", "--world-size", "2"]) == 0
    assert "dino_head" in capsys.readouterr().out
