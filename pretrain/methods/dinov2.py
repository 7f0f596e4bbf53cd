"""``method = "dinov2"``: DINOv2 pretraining, a student and its EMA teacher (:class:`SSLMetaArch`).

Modules: the student (trained: backbone, DINO head, optional iBOT head) and the teacher, an EMA of the student
sharded like it; both register ``forward_features`` / ``forward_features_list`` with FSDP. Views: the multi-crop
batch with iBOT block masks of the global crops. Parameter groups: layer-wise lr decay, no weight decay on norms,
biases and LayerScale, the prototype layer frozen early (:func:`pretrain.optim.build_param_groups`); clipping per
student submodule. Checkpoint state: student, teacher and the softmax centers. Export: ``teacher.pth`` and
``student.pth`` (official DINOv2 backbone layout + ``.json`` sidecar) and ``teacher_heads.pth`` (heads, centers).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import ModelState, OptimizerState, full_state_dict
from pretrain.config import MaskedDataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.head_warmup import HeadWarmupConfig, lr_groups, target_stats
from pretrain.metrics import vit_forward_flops
from pretrain.models import export_backbone
from pretrain.models.heads import HeadsConfig
from pretrain.optim import ScheduleValues, build_param_groups
from pretrain.ssl.meta_arch import BackboneConfig, LossConfig, SSLMetaArch
from pretrain.ssl.monitors import collapse_metrics

__all__ = ["DINOv2Config", "DINOv2Method", "export_backbone_with_config", "vit_flops"]

logger = logging.getLogger("pretrain")

FORWARD_METHODS = ("forward_features", "forward_features_list")


@dataclasses.dataclass(kw_only=True)
class DINOv2Config(TrainConfig):
    """A DINOv2 pretraining run: the shared sections plus ``backbone``, ``heads`` and ``loss``."""

    method: str = "dinov2"
    """The training method (this class: 'dinov2')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    """Student/teacher ViT."""
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    """DINO / iBOT heads."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Objective weights and target normalisation."""
    data: MaskedDataConfig
    """Shards, crops, masking."""
    head_warmup: HeadWarmupConfig = dataclasses.field(default_factory=HeadWarmupConfig)
    """Continuing from a released backbone (``backbone.weights``): train the fresh heads first
    (:mod:`pretrain.methods.head_warmup`); off by default."""


def vit_flops(backbone: nn.Module, crops: torch.Tensor | None) -> float:
    """Forward FLOPs of a dinoforge ViT on a batch of ``crops`` (0 for none)."""
    if crops is None or not crops.numel():
        return 0.0
    c = backbone.cfg
    tokens = (crops.shape[-2] // c.patch_size) * (crops.shape[-1] // c.patch_size) + 1 + c.num_register_tokens
    return vit_forward_flops(c.embed_dim, c.depth, int(c.embed_dim * c.mlp_ratio), tokens,
                             c.ffn == "swiglu") * crops.shape[0]


def export_backbone_with_config(state_dict: dict[str, torch.Tensor], path: Path, *, name: str, backbone: nn.Module,
                                extra: dict[str, Any] | None = None) -> None:
    """``export_backbone`` of the ``backbone.*`` keys, then the sidecar gets the full ViT config (no drop path)."""
    export_backbone(state_dict, str(path), name=name, prefix="backbone.")
    sidecar = path.with_name(path.name + ".json")
    meta = json.loads(sidecar.read_text())
    meta["config"] = {k: v for k, v in dataclasses.asdict(backbone.cfg).items() if k != "attn_backend"}
    meta["config"]["drop_path_rate"] = 0.0
    meta.update(extra or {})
    sidecar.write_text(json.dumps(meta, indent=2))


@register_method
class DINOv2Method(Method):
    """DINOv2: DINO + iBOT + KoLeo between a student and its EMA teacher."""

    name = "dinov2"
    config_class = DINOv2Config
    cfg: DINOv2Config
    arch: SSLMetaArch

    def build(self) -> SSLMetaArch:
        arch = SSLMetaArch(self.cfg.backbone, self.cfg.heads, self.cfg.loss)
        if self.cfg.head_warmup.enabled:  # the iteration the backbone was unfrozen (-1: still frozen), checkpointed
            arch.register_buffer("backbone_unfrozen_at", torch.tensor(-1, dtype=torch.long))
        return arch

    def _frozen(self) -> bool:
        return self.cfg.head_warmup.enabled and int(self.arch.backbone_unfrozen_at) < 0

    def parts(self) -> list[Part]:
        arch = self.arch
        parts = [Part("student", arch.student, "trained", forward_methods=FORWARD_METHODS),
                 Part("teacher", arch.teacher, "ema", ema_of="student", forward_methods=FORWARD_METHODS)]
        if arch.gram_teacher is not None:  # sharded like the student (and the teacher it is copied from)
            parts.append(Part("gram_teacher", arch.gram_teacher, "ema", ema_of="student",
                              forward_methods=FORWARD_METHODS))
        return parts

    def views(self, crops: MultiCropConfig) -> Views:
        """The phase's crops; with ``phases.gram_upscale = f`` the global crops are rendered at f x their size (and
        the masks on the student's grid): the Gram teacher sees them, the student and teacher a downscaled copy."""
        patch = self.arch.student["backbone"].patch_size
        f = crops.hires_factor
        self._hires = f
        if f == 1:
            return Views(crops=crops, patch_size=patch, masking=self.cfg.data.masking)
        if self.arch.gram_teacher is None:
            raise ValueError("phases.gram_upscale > 1 feeds the Gram teacher; it needs loss.gram_weight > 0")
        hires = dataclasses.replace(crops, global_size=crops.global_size * f, hires_factor=1,
                                    global_size_choices=tuple(v * f for v in crops.global_size_choices))
        return Views(crops=hires, patch_size=patch * f, masking=self.cfg.data.masking)

    def param_groups(self) -> list[dict[str, Any]]:
        return build_param_groups(self.arch.student, self.cfg.optim, split_backbone=self.cfg.head_warmup.enabled)

    def adjust_lr(self, optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
        """Head warm-up: backbone lr 0 while frozen, then its own linear warm-up."""
        if self.cfg.head_warmup.enabled:
            factor = self.cfg.head_warmup.backbone_factor(values.step, int(self.arch.backbone_unfrozen_at))
            for group in lr_groups(optimizer):
                group["lr"] *= factor

    def clip_modules(self) -> dict[str, nn.Module]:
        """Backbone, dino_head and ibot_head, each clipped separately (as DINOv2)."""
        return dict(self.arch.student.named_children())

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        if self.arch.gram_teacher is not None and values.step == self.cfg.loss.gram_start:
            self.arch.refresh_gram_teacher()  # Gram anchoring starts: the Gram teacher is the current EMA teacher
        frozen = self._frozen()
        f = getattr(self, "_hires", 1)
        if f > 1:  # high-resolution Gram teacher: the other networks see the crops downscaled to their size
            g = batch["global_crops"]
            small = F.interpolate(g.float(), size=(g.shape[-2] // f, g.shape[-1] // f), mode="bicubic",
                                  antialias=True, align_corners=False).to(g.dtype)
            batch = {**batch, "global_crops": small, "gram_crops": g}
        loss, out = self.arch.compute_losses(batch, values.teacher_temp, values.step, freeze_backbone=frozen)
        if self.cfg.head_warmup.enabled:
            ex = out["extras"]
            ent, agree = target_stats(ex["teacher_probs"], ex["student_cls_logits"])
            self._warmup_stats = (ent, agree)
            out["losses"].update(warmup_entropy=torch.tensor(ent), warmup_agreement=torch.tensor(agree),
                                 backbone_frozen=torch.tensor(float(frozen)))  # fmt: skip
        return loss, out

    def after_step(self, values: ScheduleValues) -> None:
        """The teacher EMA of the student (``SSLMetaArch.update_teacher``); the Gram teacher refresh on its
        schedule (every ``loss.gram_refresh_every`` iterations after ``loss.gram_start``)."""
        self.arch.update_teacher(values.momentum)
        warm = self.cfg.head_warmup
        if self._frozen() and warm.informative(values.step, *self._warmup_stats):
            self.arch.backbone_unfrozen_at.fill_(values.step + 1)
            logger.info("head warm-up done after %d iterations (target entropy %.3f of log K, agreement %.3f): "
                        "the backbone trains from now on", values.step + 1, *self._warmup_stats)  # fmt: skip
        loss = self.cfg.loss
        done = values.step + 1 - loss.gram_start
        if self.arch.gram_teacher is not None and done > 0 and done % loss.gram_refresh_every == 0:
            self.arch.refresh_gram_teacher()

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        ex = out["extras"]
        return collapse_metrics(teacher_probs=ex["teacher_probs"], student_logits=ex["student_cls_logits"],
                                student_temp=self.cfg.loss.student_temp, embeddings=ex["teacher_cls"].chunk(2)[0])

    def flops_per_sample(self, batch: dict[str, Any]) -> float:
        """Student forward + backward on all crops (3x forward) and the teacher forward on the global crops."""
        backbone = self.arch.student["backbone"]
        g = batch["global_crops"]
        f_g, f_l = vit_flops(backbone, g), vit_flops(backbone, batch.get("local_crops"))
        return (3 * (f_g + f_l) + f_g) / max(g.shape[0] // 2, 1)

    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Student, teacher and the softmax centers; the optimizer keyed by student parameter names."""
        return {"model": ModelState(self.arch), "optim": OptimizerState(self.arch.student, optimizer)}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``teacher.pth``, ``student.pth`` (official backbone layout + sidecar) and ``teacher_heads.pth``."""
        teacher = full_state_dict(self.arch.teacher)
        student = full_state_dict(self.arch.student)
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        backbone = self.arch.student["backbone"]
        for sd, file in ((teacher, "teacher.pth"), (student, "student.pth")):
            export_backbone_with_config(sd, out / file, name=self.cfg.backbone.name, backbone=backbone)
        heads = {k: v for k, v in teacher.items() if not k.startswith("backbone.")}
        centers = {"dino_center": self.arch.dino_center.center.detach().cpu(),
                   "ibot_center": self.arch.ibot_center.center.detach().cpu()}
        torch.save({"heads": heads, "centers": centers, "heads_config": dataclasses.asdict(self.cfg.heads)},
                   out / "teacher_heads.pth")
        logger.info("exported teacher/student backbones and heads to %s", out)
