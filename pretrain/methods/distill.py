"""``method = "distill"``: DINOv2 distillation of a frozen teacher into one or more students
(:class:`DistillMetaArch`), each exported as the EMA of its weights.

Modules: the teacher (backbone and its DINO/iBOT heads, frozen: eval mode, no gradients, not checkpointed - it
reloads from its file), every student (trained, no masking, no drop path) and an EMA of each student sharded like
it. Views: multi-crop without masks (iBOT covers every patch). Parameter groups: per student, tagged with its
name; clipping per student submodule. Checkpoint state: students, EMAs and centers. Export:
``<student>.pth`` (EMA backbone, official DINOv2 layout + ``.json`` sidecar), ``<student>_raw.pth`` (the trained
weights before averaging) and ``<student>_heads.pth`` (EMA heads and centers, so a student can teach).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import ModelState, OptimizerState, full_state_dict
from pretrain.config import TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.data.masking import MaskingConfig
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.dinov2 import FORWARD_METHODS, export_backbone_with_config, vit_flops
from pretrain.models import ViTConfig
from pretrain.optim import ScheduleValues, build_param_groups
from pretrain.ssl.distill_arch import DistillMetaArch, StudentConfig, TeacherConfig
from pretrain.ssl.meta_arch import LossConfig
from pretrain.ssl.monitors import collapse_metrics

__all__ = ["DistillConfig", "DistillMethod"]

logger = logging.getLogger("pretrain")


@dataclasses.dataclass(kw_only=True)
class DistillConfig(TrainConfig):
    """A distillation run: the shared sections (``data`` without masking) plus ``teacher``, ``students``, ``loss``
    and ``feature_weight``."""

    name: str = "distill"
    """Run name (logs)."""
    method: str = "distill"
    """The training method (this class: 'distill')."""
    teacher: TeacherConfig
    """The frozen teacher: backbone weights and its DINO/iBOT heads."""
    students: list[StudentConfig]
    """One or more students trained on the same batches (DINOv3-style multi-student distillation)."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Objective weights (iBOT is on all global-crop patches) and the teacher target normalisation."""
    feature_weight: float = 0.0
    """Weight of an optional feature-distillation term, not part of the DINOv2 recipe (0 = off, the paper's
    setting): ``1 - cos(W s, t)`` between each student's CLS token of a global crop, mapped by a trained linear
    ``feature_head``, and the teacher's CLS token of the same crop."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.students:
            raise ValueError("students: give at least one [[students]] entry")
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"students.name must be unique, got {names}")
        if not self.feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")


@register_method
class DistillMethod(Method):
    """Frozen teacher, students and their EMAs (see the module docstring)."""

    name = "distill"
    config_class = DistillConfig
    cfg: DistillConfig
    arch: DistillMetaArch

    def build(self) -> DistillMetaArch:
        return DistillMetaArch(self.cfg.teacher, self.cfg.students, self.cfg.loss,
                               feature_weight=self.cfg.feature_weight)

    def parts(self) -> list[Part]:
        arch = self.arch
        parts = [Part("teacher", arch.teacher, "frozen", forward_methods=FORWARD_METHODS)]
        for name in arch.students:  # a student and its EMA sharded alike -> shard-local EMA
            parts += [Part(name, arch.students[name], "trained", forward_methods=FORWARD_METHODS),
                      Part(f"{name}.ema", arch.emas[name], "ema", ema_of=name, forward_methods=FORWARD_METHODS)]
        return parts

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=crops, patch_size=self.arch.patch_size, masking=MaskingConfig(mask_probability=0.0))

    def param_groups(self) -> list[dict[str, Any]]:
        """Each student's DINOv2 parameter groups, tagged ``student=<name>``."""
        return [{**group, "student": name} for name, student in self.arch.students.items()
                for group in build_param_groups(student, self.cfg.optim)]

    def clip_modules(self) -> dict[str, nn.Module]:
        """``<student>.<submodule>`` (backbone, dino_head, ibot_head, feature_head) of every student."""
        return {f"{name}.{child}": module for name, student in self.arch.students.items()
                for child, module in student.named_children()}

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        return self.arch.compute_losses(batch, values.teacher_temp)

    def after_step(self, values: ScheduleValues) -> None:
        """Each student's EMA (``DistillMetaArch.update_teacher``; the teacher is frozen)."""
        self.arch.update_teacher(values.momentum)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        ex = out["extras"]
        metrics: dict[str, float] = {}
        for name, s in ex["students"].items():
            m = collapse_metrics(teacher_probs=ex["teacher_probs"], student_logits=s["cls_logits"],
                                 student_temp=self.cfg.loss.student_temp, embeddings=s["cls"].chunk(2)[0])
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
        return metrics

    def flops_per_sample(self, batch: dict[str, Any]) -> float | None:
        """The teacher forward on the global crops plus forward + backward of every student on all crops."""
        nets = [self.arch.teacher, *self.arch.students.values()]
        if not all(isinstance(n["backbone"].cfg, ViTConfig) for n in nets):
            return None  # the FLOP model is the ViT's (e.g. ResNet students)
        g, loc = batch["global_crops"], batch.get("local_crops")
        flops = vit_flops(self.arch.teacher["backbone"], g) + sum(
            3 * (vit_flops(s["backbone"], g) + vit_flops(s["backbone"], loc)) for s in self.arch.students.values())
        return flops / max(g.shape[0] // 2, 1)

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Students, EMAs and centers (the frozen teacher reloads from its file); the students' optimizer."""
        return {"model": ModelState(self.arch.checkpoint_modules()),
                "optim": OptimizerState(self.arch.students, optimizer)}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``<student>.pth`` (EMA), ``<student>_raw.pth`` and ``<student>_heads.pth`` for every student."""
        gathered = {name: (full_state_dict(self.arch.emas[name]), full_state_dict(self.arch.students[name]))
                    for name in self.arch.students}
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        centers = {"dino_center": self.arch.dino_center.center.detach().cpu(),
                   "ibot_center": self.arch.ibot_center.center.detach().cpu()}
        for name, (ema, raw) in gathered.items():
            backbone = self.arch.students[name]["backbone"]
            for sd, path in ((ema, out / f"{name}.pth"), (raw, out / f"{name}_raw.pth")):
                export_backbone_with_config(sd, path, name=self.arch.student_archs[name], backbone=backbone,
                                            extra={"distilled_from": self.cfg.teacher.weights})
            heads = {k: v for k, v in ema.items() if not k.startswith("backbone.")}
            torch.save({"heads": heads, "centers": centers, "heads_config": dataclasses.asdict(self.arch.heads_cfg)},
                       out / f"{name}_heads.pth")
        logger.info("exported students %s (EMA backbones, raw backbones, heads) to %s", sorted(gathered), out)

    def summary(self) -> str:
        t = sum(p.numel() for p in self.arch.teacher.parameters())
        return f"frozen teacher {t / 1e6:.2f}M params; students: " + ", ".join(
            f"{n} ({self.arch.student_archs[n]}, {sum(p.numel() for p in s.parameters()) / 1e6:.2f}M)"
            for n, s in self.arch.students.items())
