"""Continuing DINOv2 pretraining from a released backbone: a head warm-up before the backbone trains.

Released DINOv2 / DINOv3 files hold the backbone only. Fresh DINO / iBOT heads give near-uniform, arbitrary
targets at first; if the backbone trains against them from step 1 its features are pulled towards noise (users
report k-NN falling from ~80% to ~10%). With ``head_warmup.max_iters > 0`` the DINOv2 method therefore

1. trains only the heads (the student backbone runs without gradients; the teacher, an EMA of an unchanged
   backbone, stays the released one) until the targets are informative: the teacher-target entropy has fallen
   to ``max_entropy`` x log K or below *and* the student's prototype argmax agrees with the teacher's on at least
   ``min_agreement`` of the global crops (both averaged over ranks, logged every step as ``warmup_entropy`` and
   ``warmup_agreement``), after ``min_iters`` and at most ``max_iters`` iterations;
2. then unfreezes the backbone, whose lr ramps linearly from 0 to ``backbone_lr_mult`` x the scheduled lr over
   ``backbone_warmup_iters`` iterations (its own warm-up; the heads keep the schedule).

The iteration at which the backbone was unfrozen is a buffer of the model, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from pretrain.utils.dist import all_reduce_sum_, world_size

__all__ = ["HeadWarmupConfig", "lr_groups", "target_stats"]


@dataclasses.dataclass(kw_only=True)
class HeadWarmupConfig:
    """Head warm-up of continued pretraining (off with ``max_iters = 0``)."""

    max_iters: int = 0
    """Longest head-only stretch (iterations); 0 disables the warm-up (everything trains from step 0)."""
    min_iters: int = 50
    """Shortest head-only stretch."""
    max_entropy: float = 0.95
    """Informative targets: mean teacher-target entropy / log K at most this."""
    min_agreement: float = 0.2
    """Informative targets: student argmax == teacher argmax on at least this fraction of global crops."""
    backbone_warmup_iters: int = 100
    """After unfreezing, the backbone lr ramps linearly from 0 over this many iterations."""
    backbone_lr_mult: float = 1.0
    """Backbone lr relative to the scheduled lr once warmed up."""

    def __post_init__(self) -> None:
        for name in ("max_iters", "min_iters", "backbone_warmup_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"head_warmup.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_iters and self.min_iters > self.max_iters:
            raise ValueError(f"head_warmup.min_iters ({self.min_iters}) exceeds max_iters ({self.max_iters})")
        if not 0.0 < self.max_entropy <= 1.0 or not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError("head_warmup.max_entropy must be in (0, 1] and head_warmup.min_agreement in [0, 1], got "
                             f"{self.max_entropy}, {self.min_agreement}")  # fmt: skip
        if self.backbone_lr_mult <= 0:
            raise ValueError(f"head_warmup.backbone_lr_mult must be > 0, got {self.backbone_lr_mult}")

    @property
    def enabled(self) -> bool:
        return self.max_iters > 0

    def informative(self, step: int, entropy: float, agreement: float) -> bool:
        """Unfreeze after iteration ``step`` (0-based) given this step's target statistics."""
        done = step + 1
        return done >= self.max_iters or (done >= self.min_iters and entropy <= self.max_entropy
                                          and agreement >= self.min_agreement)  # fmt: skip

    def backbone_factor(self, step: int, unfrozen_at: int) -> float:
        """Multiplier of the backbone lr at ``step``: 0 while frozen, then a linear ramp to ``backbone_lr_mult``."""
        if unfrozen_at < 0 or step < unfrozen_at:
            return 0.0
        n = self.backbone_warmup_iters
        ramp = 1.0 if not n else min(1.0, (step - unfrozen_at + 1) / n)
        return ramp * self.backbone_lr_mult


@torch.no_grad()
def target_stats(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> tuple[float, float]:
    """``(entropy / log K, argmax agreement)`` of teacher targets vs student logits, averaged over all ranks."""
    p = teacher_probs.float()
    k = p.shape[-1]
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(k)
    agree = (student_logits[: len(p)].argmax(-1) == p.argmax(-1)).float().mean()
    stats = torch.stack([ent, agree]).to(torch.float64)
    if world_size() > 1:
        all_reduce_sum_(stats)
        stats /= world_size()
    return float(stats[0]), float(stats[1])


def lr_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's backbone parameter groups (``is_backbone``)."""
    return [g for g in optimizer.param_groups if g.get("is_backbone")]
