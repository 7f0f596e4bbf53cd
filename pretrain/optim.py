"""Schedules, AdamW parameter groups and per-submodule gradient clipping of the DINOv2 recipe.

Schedules work in iterations; an "epoch" is ``epoch_length`` iterations (1250 as in DINOv2, whatever the data
size). Each schedule is the reference ``CosineScheduler``: ``freeze`` zeros, then a linear warm-up
``linspace(start, base, warmup)`` (endpoint included), then ``final + (base - final)(1 + cos(pi i / n)) / 2`` over
the remaining ``n`` iterations, and ``final`` from ``total`` on.

Per step the loop calls ``values = schedules.at(step)`` and ``apply_schedules(optimizer, values)``, which sets
``lr = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]`` and
``weight_decay = wd * group["wd_multiplier"]`` on each group made by :func:`build_param_groups`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "OptimConfig",
    "ScheduleConfig",
    "ScheduleValues",
    "Schedules",
    "apply_schedules",
    "build_optimizer",
    "build_param_groups",
    "clip_grad_per_module",
    "cosine_schedule",
    "param_table",
]


def cosine_schedule(
    step: int, *, base: float, final: float, total: int, warmup: int = 0, start: float = 0.0, freeze: int = 0
) -> float:
    """Value at iteration ``step`` of the DINOv2 ``CosineScheduler(base, final, total, warmup, start, freeze)``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= total:
        return final
    if step < freeze:
        return 0.0
    i = step - freeze
    if i < warmup:
        return start if warmup == 1 else start + (base - start) * i / (warmup - 1)
    i -= warmup
    n = total - freeze - warmup
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n))


@dataclasses.dataclass(kw_only=True)
class ScheduleConfig:
    """Iteration schedules (defaults: DINOv2 ``ssl_default_config``; epochs are ``epoch_length`` iterations)."""

    epoch_length: int = 1250
    """Iterations per "epoch" (OFFICIAL_EPOCH_LENGTH)."""
    epochs: int = 100
    """Training length in epochs (total iterations = epochs * epoch_length)."""
    base_lr: float = 0.004
    """Peak lr at the reference batch size; scaled by sqrt(global_batch / lr_reference_batch)."""
    lr_reference_batch: int = 1024
    """Batch size at which base_lr applies (DINOv2 sqrt_wrt_1024)."""
    min_lr: float = 1.0e-6
    """Final lr of the cosine decay."""
    warmup_epochs: float = 10
    """Linear lr warm-up from 0, in epochs."""
    weight_decay: float = 0.04
    """Weight decay at the start (cosine to weight_decay_end)."""
    weight_decay_end: float = 0.4
    """Weight decay at the end (0.2 for ViT-L/g)."""
    momentum_teacher: float = 0.992
    """EMA teacher momentum at the start (0.994 for ViT-L/g); cosine to final_momentum_teacher."""
    final_momentum_teacher: float = 1.0
    """EMA teacher momentum at the end."""
    teacher_temp: float = 0.07
    """Teacher temperature after the warm-up."""
    warmup_teacher_temp: float = 0.04
    """Teacher temperature at iteration 0 (linear warm-up)."""
    warmup_teacher_temp_epochs: float = 30
    """Teacher temperature warm-up length in epochs (then constant)."""
    freeze_last_layer_epochs: float = 1
    """Epochs during which the prototype layer(s) get lr 0."""
    lr_milestones: list[float] = dataclasses.field(default_factory=list)
    """Epochs of a step lr schedule (MoCo v1: [120, 160] of 200): after the warm-up the lr stays at its peak and is
    multiplied by ``lr_step_gamma`` at each milestone. Empty: the cosine decay to ``min_lr``."""
    lr_step_gamma: float = 0.1
    """Factor of the step schedule at each milestone."""

    def __post_init__(self) -> None:
        positive = ("epoch_length", "epochs", "lr_reference_batch", "teacher_temp", "warmup_teacher_temp")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"schedule.{name} must be > 0, got {getattr(self, name)}")
        non_negative = ("base_lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
                        "warmup_teacher_temp_epochs", "freeze_last_layer_epochs")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"schedule.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("momentum_teacher", "final_momentum_teacher"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"schedule.{name} must be in [0, 1], got {getattr(self, name)}")
        if any(m <= 0 for m in self.lr_milestones) or sorted(self.lr_milestones) != list(self.lr_milestones):
            raise ValueError(f"schedule.lr_milestones must be increasing epochs > 0, got {self.lr_milestones}")
        if not 0.0 < self.lr_step_gamma <= 1.0:
            raise ValueError(f"schedule.lr_step_gamma must be in (0, 1], got {self.lr_step_gamma}")
        if self.warmup_iters + self.freeze_last_layer_iters >= self.total_iters:
            raise ValueError(
                f"schedule.warmup_epochs ({self.warmup_epochs}) + freeze_last_layer_epochs "
                f"({self.freeze_last_layer_epochs}) must be shorter than epochs ({self.epochs})"
            )

    @property
    def total_iters(self) -> int:
        return int(self.epochs * self.epoch_length)

    @property
    def warmup_iters(self) -> int:
        return int(self.warmup_epochs * self.epoch_length)

    @property
    def freeze_last_layer_iters(self) -> int:
        return int(self.freeze_last_layer_epochs * self.epoch_length)

    @property
    def teacher_temp_warmup_iters(self) -> int:
        return int(self.warmup_teacher_temp_epochs * self.epoch_length)


@dataclasses.dataclass(frozen=True)
class ScheduleValues:
    """Everything the loop needs at one iteration."""

    lr: float
    last_layer_lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    step: int = -1
    """The iteration these values are for (-1: not given)."""


class Schedules:
    """All DINOv2 schedules for one run; ``peak_lr = base_lr * sqrt(global_batch / lr_reference_batch)``."""

    def __init__(self, cfg: ScheduleConfig, global_batch_size: int) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.cfg = cfg
        self.peak_lr = cfg.base_lr * math.sqrt(global_batch_size / cfg.lr_reference_batch)

    def at(self, step: int) -> ScheduleValues:
        c = self.cfg
        total, warmup = c.total_iters, c.warmup_iters
        lr = cosine_schedule(step, base=self.peak_lr, final=c.min_lr, total=total, warmup=warmup)
        freeze = c.freeze_last_layer_iters
        last_lr = cosine_schedule(step, base=self.peak_lr, final=c.min_lr, total=total, warmup=warmup, freeze=freeze)
        if c.lr_milestones and step >= warmup:  # the step schedule replaces the cosine after the warm-up
            lr = self.peak_lr * c.lr_step_gamma ** sum(step >= m * c.epoch_length for m in c.lr_milestones)
            last_lr = 0.0 if step < freeze else lr
        wd = cosine_schedule(step, base=c.weight_decay, final=c.weight_decay_end, total=total)
        momentum = cosine_schedule(step, base=c.momentum_teacher, final=c.final_momentum_teacher, total=total)
        tw = c.teacher_temp_warmup_iters
        temp = cosine_schedule(step, base=c.teacher_temp, final=c.teacher_temp, total=tw, warmup=tw,
                               start=c.warmup_teacher_temp)
        return ScheduleValues(lr=lr, last_layer_lr=last_lr, weight_decay=wd, momentum=momentum, teacher_temp=temp,
                              step=step)


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """AdamW, parameter groups and clipping (DINOv2 defaults; layerwise_decay 1.0 for ViT-L/g)."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    layerwise_decay: float = 0.9
    """lr multiplier rate ** (n_blocks + 1 - layer): embeddings/tokens are layer 0, block i is i + 1."""
    patch_embed_lr_mult: float = 0.2
    """Extra lr multiplier for the patch embedding."""
    clip_grad: float = 3.0
    """Max gradient norm per student submodule (0 disables clipping; norms are still measured)."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if not 0.0 < self.layerwise_decay <= 1.0:
            raise ValueError(f"optim.layerwise_decay must be in (0, 1], got {self.layerwise_decay}")
        if self.patch_embed_lr_mult < 0:
            raise ValueError(f"optim.patch_embed_lr_mult must be >= 0, got {self.patch_embed_lr_mult}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")


# Wrapper prefixes that must not change a parameter's group (activation checkpointing, torch.compile, FSDP1).
_WRAPPER_PARTS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")
_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _layer_id(name: str, n_blocks: int) -> int:
    """0 for embeddings and tokens, i + 1 for ``blocks.i``, n_blocks + 1 for everything else (norm, heads)."""
    last = name.rsplit(".", 1)[-1]
    if any(part in _EMBEDDING_NAMES for part in name.split(".")) or last in _EMBEDDING_NAMES:
        return 0
    match = _BLOCK_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    return n_blocks + 1


def _n_blocks(model: nn.Module) -> int:
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is None:
            continue
        if isinstance(getattr(candidate, "n_blocks", None), int):
            return candidate.n_blocks
        blocks = getattr(candidate, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            return len(blocks)
    return 0


def param_table(model: nn.Module, *, layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2,
                n_blocks: int | None = None) -> list[dict]:
    """One dict per trainable parameter: name, param, lr_multiplier, wd_multiplier, is_last_layer.

    ``model`` is the student: a backbone, or a module holding ``backbone`` and heads (names like
    ``backbone.blocks.3.attn.qkv.weight``, ``dino_head.last_layer.weight_v``). Rules (DINOv2):
    lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer) (x patch_embed_lr_mult for the patch embedding);
    wd_multiplier = 0 for names ending in ``.bias`` or containing ``norm`` or ``gamma`` (LayerScale), 1 otherwise
    (tokens and pos_embed are decayed, and so is the head's ``weight_g`` as in the reference);
    is_last_layer for names containing ``last_layer`` (the prototypes, frozen for the first epoch).
    """
    n_blocks = _n_blocks(model) if n_blocks is None else n_blocks
    rows = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _WRAPPER_PARTS.sub("", raw_name)
        lr_mult = layerwise_decay ** (n_blocks + 1 - _layer_id(name, n_blocks))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = name.endswith(".bias") or name == "bias" or "norm" in name or "gamma" in name
        rows.append({"name": name, "param": param, "lr_multiplier": lr_mult,
                     "wd_multiplier": 0.0 if no_wd else 1.0, "is_last_layer": "last_layer" in name})
    return rows


def build_param_groups(model: nn.Module, cfg: OptimConfig | None = None, *, n_blocks: int | None = None,
                       split_backbone: bool = False) -> list[dict]:  # fmt: skip
    """AdamW param groups fused by (lr_multiplier, wd_multiplier, is_last_layer); see :func:`param_table`.

    Each group carries ``params``, ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer`` and ``n_params``;
    :func:`apply_schedules` sets its ``lr`` / ``weight_decay`` every step. With ``split_backbone`` the
    ``backbone.*`` parameters never share a group with the heads (``is_backbone`` marks theirs), so a method can
    give the backbone its own lr (continued pretraining).
    """
    cfg = cfg or OptimConfig()
    groups: dict[tuple[float, float, bool, bool], dict] = {}
    for row in param_table(model, layerwise_decay=cfg.layerwise_decay, patch_embed_lr_mult=cfg.patch_embed_lr_mult,
                           n_blocks=n_blocks):
        backbone = split_backbone and row["name"].startswith("backbone.")
        key = (row["lr_multiplier"], row["wd_multiplier"], row["is_last_layer"], backbone)
        group = groups.setdefault(key, {"params": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                                        "is_last_layer": key[2], "n_params": 0})
        if split_backbone:
            group["is_backbone"] = backbone
        group["params"].append(row["param"])
        group["n_params"] += row["param"].numel()
    if not groups:
        raise ValueError("the model has no trainable parameter")
    return list(groups.values())


def build_optimizer(param_groups: list[dict], cfg: OptimConfig | None = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` with lr / weight decay 0 until :func:`apply_schedules` sets them."""
    cfg = cfg or OptimConfig()
    return torch.optim.AdamW(param_groups, lr=0.0, weight_decay=0.0, betas=cfg.betas, eps=cfg.eps)


def apply_schedules(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """Set every group's lr and weight decay for this step from ``values`` and the group multipliers."""
    for group in optimizer.param_groups:
        base = values.last_layer_lr if group.get("is_last_layer", False) else values.lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = values.weight_decay * group.get("wd_multiplier", 1.0)


def _full_norm(norm: torch.Tensor) -> torch.Tensor:
    full = getattr(norm, "full_tensor", None)  # DTensor (FSDP2) -> replicated value
    return full() if callable(full) else norm


def clip_grad_per_module(modules: Mapping[str, nn.Module] | nn.ModuleDict | Iterable[tuple[str, nn.Module]],
                         max_norm: float = 3.0) -> dict[str, float]:
    """Clip each submodule's gradients to ``max_norm`` separately (DINOv2: backbone, dino_head, ibot_head).

    Returns ``{name: total grad norm before clipping}`` (NaN / inf when a gradient is non-finite, in which case
    nothing of that module is scaled). ``max_norm <= 0`` only measures. Works with FSDP2 DTensor parameters
    (``clip_grad_norm_`` reduces the norm over the mesh); modules without gradients report 0.
    """
    items = modules.items() if isinstance(modules, (Mapping, nn.ModuleDict)) else modules
    norms: dict[str, float] = {}
    for name, module in items:
        grads = [p for p in module.parameters() if p.grad is not None]
        if not grads:
            norms[name] = 0.0
            continue
        total = torch.nn.utils.get_total_norm([p.grad for p in grads])
        value = float(_full_norm(total))
        if max_norm > 0 and math.isfinite(value):
            torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
        norms[name] = value
    return norms
