"""DINOv2 student / EMA-teacher meta-architecture: one call computes DINO + iBOT + KoLeo for a multi-crop batch.

The teacher (backbone + heads) is a copy of the student that gets no gradients, runs without drop-path in eval
mode and sees only the global crops. The student sees the masked global crops and the local crops in one packed
forward. Each objective term has a weight; 0 switches it off, so plain DINO and plain iBOT are configurations
of the same code. No parallelism lives here: ``pretrain.parallel`` shards ``student`` and ``teacher``, and
:mod:`pretrain.methods.dinov2` runs this architecture in the Trainer.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.losses import SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, teacher_probs
from pretrain.models import build_backbone
from pretrain.models.heads import HeadsConfig, build_heads
from pretrain.parallel.ema import ema_update_


@dataclasses.dataclass(kw_only=True)
class BackboneConfig:
    """Which ViT the student (and teacher) use."""

    name: str = "vit_test"
    """An entry of ``pretrain.models.backbone_names()``."""
    drop_path_rate: float = 0.0
    """Student stochastic depth (DINOv2: 0.3; 0.4 for L/g). The teacher never drops paths."""
    weights: str | None = None
    """Optional initial weights (official DINOv2 or dinoforge export) for the student and teacher backbone."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Other ``ViTConfig`` fields, e.g. ``{patch_size = 7, img_size = 28, num_register_tokens = 4}``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"backbone.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if "drop_path_rate" in self.overrides:
            raise ValueError("backbone.overrides.drop_path_rate: set backbone.drop_path_rate instead")

    def build(self) -> nn.Module:
        return build_backbone(self.name, weights=self.weights, drop_path_rate=self.drop_path_rate, **self.overrides)


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    """Weights and target normalisation of the DINOv2 objective."""

    dino_weight: float = 1.0
    """Weight of the DINO (CLS, multi-crop) term; 0 disables it."""
    ibot_weight: float = 1.0
    """Weight of the iBOT (masked patch) term; 0 disables it (plain DINO)."""
    koleo_weight: float = 0.1
    """Weight of KoLeo on the student backbone CLS of each global crop; 0 disables it."""
    centering: str = "softmax"
    """Teacher target normalisation: 'softmax' (EMA centering) or 'sinkhorn' (Sinkhorn-Knopp, L/g recipes)."""
    student_temp: float = 0.1
    """Student softmax temperature."""
    center_momentum: float = 0.9
    """EMA momentum of the softmax centers."""
    sinkhorn_iters: int = 3
    """Sinkhorn-Knopp iterations."""
    koleo_distributed: bool = False
    """KoLeo nearest neighbours over the global batch (all ranks) instead of the per-rank batch."""
    gram_weight: float = 0.0
    """Gram anchoring (DINOv3, :func:`pretrain.losses.gram.gram_loss`): weight of the loss between the student's
    and the Gram teacher's patch-similarity matrices on the global crops; 0 disables it (no Gram teacher)."""
    gram_start: int = 0
    """Iteration from which Gram anchoring applies; the Gram teacher is the EMA teacher copied then."""
    gram_refresh_every: int = 10_000
    """The Gram teacher is refreshed from the EMA teacher every this many iterations after ``gram_start``
    (DINOv3: 10k)."""
    gram_clamp: str = "none"
    """Negative similarities zeroed in 'both' Gram matrices, only the 'teacher''s, or 'none'."""

    def __post_init__(self) -> None:
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.dino_weight == 0 and self.ibot_weight == 0:
            raise ValueError("loss.dino_weight and loss.ibot_weight are both 0: nothing to train")
        if self.centering not in ("softmax", "sinkhorn"):
            raise ValueError(f"loss.centering must be 'softmax' or 'sinkhorn', got {self.centering!r}")
        if self.student_temp <= 0:
            raise ValueError(f"loss.student_temp must be > 0, got {self.student_temp}")
        if not 0.0 <= self.center_momentum < 1.0:
            raise ValueError(f"loss.center_momentum must be in [0, 1), got {self.center_momentum}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"loss.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}")
        if self.gram_weight < 0 or self.gram_start < 0 or self.gram_refresh_every < 1:
            raise ValueError("loss.gram_weight and loss.gram_start must be >= 0 and loss.gram_refresh_every >= 1, got "
                             f"{self.gram_weight}, {self.gram_start}, {self.gram_refresh_every}")  # fmt: skip
        if self.gram_clamp not in ("none", "both", "teacher"):
            raise ValueError(f"loss.gram_clamp must be 'none', 'both' or 'teacher', got {self.gram_clamp!r}")


def teacher_targets_from_logits(logits: torch.Tensor, cfg: LossConfig, center: SoftmaxCenter, temp: float
                                ) -> torch.Tensor:
    """Teacher probabilities: Sinkhorn-Knopp, or softmax with the EMA ``center`` (used, then updated)."""
    return teacher_probs(logits, temp, centering=cfg.centering, center=center, sinkhorn_iters=cfg.sinkhorn_iters)


def head_logits(net: nn.ModuleDict, cls: torch.Tensor, patches: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLS logits and patch logits of ``net``'s heads; a shared head runs once on both (as DINOv2 does)."""
    if patches is None:
        return net["dino_head"](cls), None
    if "ibot_head" in net:
        return net["dino_head"](cls), net["ibot_head"](patches)
    out = net["dino_head"](torch.cat([cls, patches]))
    return out[: cls.shape[0]], out[cls.shape[0]:]


def resize_patch_grid(patches: torch.Tensor, from_hw: tuple[int, int] | torch.Size,
                      to_hw: tuple[int, int] | torch.Size) -> torch.Tensor:  # fmt: skip
    """Patch tokens (B, N, D) of images of size ``from_hw`` resized (bicubic, antialiased, as DINOv3 downsamples its
    high-resolution Gram teacher's features) to the patch grid of images of size ``to_hw`` (same patch size)."""
    b, n, d = patches.shape
    h, w = int(from_hw[0]), int(from_hw[1])
    gh = int(round((n * h / w) ** 0.5))
    gw = n // gh
    th, tw = gh * int(to_hw[0]) // h, gw * int(to_hw[1]) // w
    grid = patches.transpose(1, 2).reshape(b, d, gh, gw).float()
    out = F.interpolate(grid, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
    return out.flatten(2).transpose(1, 2).to(patches.dtype)


class SSLMetaArch(nn.Module):
    """``student`` and ``teacher`` ModuleDicts with ``backbone``, ``dino_head`` and optionally ``ibot_head``."""

    def __init__(self, backbone: BackboneConfig, heads: HeadsConfig, loss: LossConfig) -> None:
        super().__init__()
        self.loss_cfg = loss
        self.heads_cfg = heads
        net = backbone.build()
        self.student = nn.ModuleDict({"backbone": net, **build_heads(heads, net.embed_dim)})
        self.teacher = copy.deepcopy(self.student)
        for blk in self.teacher["backbone"].blocks:
            blk.drop_path = 0.0
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # Gram teacher (DINOv3): a snapshot of the EMA teacher, refreshed on a schedule; same structure as the
        # student so it is sharded like it and the copy from the teacher stays shard-local.
        self.gram_teacher = copy.deepcopy(self.teacher) if loss.gram_weight > 0 else None
        self.dino_center = SoftmaxCenter(heads.out_dim, loss.center_momentum)
        ibot_dim = heads.ibot_out_dim if heads.separate_ibot_head else heads.out_dim
        self.ibot_center = SoftmaxCenter(ibot_dim, loss.center_momentum)

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # the teacher never uses drop-path or train-mode behaviour
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def gram_active(self, step: int) -> bool:
        """Gram anchoring applies at iteration ``step``."""
        return self.gram_teacher is not None and step >= self.loss_cfg.gram_start

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        """Gram teacher <- EMA teacher (shard-local copy)."""
        for g, t in zip(self.gram_teacher.parameters(), self.teacher.parameters(), strict=True):
            g.copy_(t)

    @property
    def use_ibot(self) -> bool:
        return self.loss_cfg.ibot_weight > 0

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, mask_indices: torch.Tensor | None, temp: float
                        ) -> dict[str, torch.Tensor | None]:
        """Teacher CLS targets (2B, K) and, with iBOT, masked-patch targets (M, K) of the unmasked view."""
        out = self.teacher["backbone"].forward_features(global_crops)
        patches = None
        if self.use_ibot and mask_indices is not None:
            patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        cls_logits, patch_logits = head_logits(self.teacher, out["x_norm_clstoken"], patches)
        dino_probs = teacher_targets_from_logits(cls_logits, self.loss_cfg, self.dino_center, temp)
        ibot_probs = None
        if patch_logits is not None:
            ibot_probs = teacher_targets_from_logits(patch_logits, self.loss_cfg, self.ibot_center, temp)
        return {"cls_logits": cls_logits, "dino_probs": dino_probs, "ibot_probs": ibot_probs,
                "cls": out["x_norm_clstoken"]}

    def compute_losses(self, batch: dict[str, Any], teacher_temp: float, step: int = -1,
                       freeze_backbone: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
        """Total loss (with gradients into the student) and its parts, from a collated multi-crop batch.

        ``batch`` keys: ``global_crops`` (2B, 3, H, W) and ``local_crops`` (nB, 3, h, w), both crop-major;
        ``masks`` (2B, N) bool; ``mask_indices`` (M,) into ``masks.flatten()``; ``masks_weight`` (M,).
        """
        cfg = self.loss_cfg
        g = batch["global_crops"]
        loc = batch.get("local_crops")
        n_global = g.shape[0]
        masks = batch["masks"] if self.use_ibot else None
        mask_idx = batch["mask_indices"] if self.use_ibot else None
        teacher = self.teacher_targets(g, mask_idx, teacher_temp)

        crops = [g] if loc is None or loc.shape[0] == 0 else [g, loc]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_backbone):  # head warm-up: heads only
            outs = self.student["backbone"].forward_features_list(crops, [masks] + [None] * (len(crops) - 1))
        s_cls = torch.cat([o["x_norm_clstoken"] for o in outs])  # view-major: globals then locals
        s_patches = outs[0]["x_norm_patchtokens"].flatten(0, 1)[mask_idx] if self.use_ibot else None
        s_cls_logits, s_patch_logits = head_logits(self.student, s_cls, s_patches)

        parts: dict[str, Any] = {}
        total = s_cls.new_zeros((), dtype=torch.float32)
        if cfg.dino_weight > 0:
            n_views = s_cls.shape[0] // (n_global // 2)
            parts["dino"] = dino_loss(s_cls_logits, teacher["dino_probs"], cfg.student_temp,
                                      n_teacher_views=2, n_student_views=n_views)
            total = total + cfg.dino_weight * parts["dino"]
        if self.use_ibot:
            parts["ibot"] = ibot_loss(s_patch_logits, teacher["ibot_probs"], masks, cfg.student_temp,
                                      weights=batch.get("masks_weight"))
            total = total + cfg.ibot_weight * parts["ibot"]
        if cfg.koleo_weight > 0:
            g_cls = outs[0]["x_norm_clstoken"]
            parts["koleo"] = sum(koleo_loss(c, distributed=cfg.koleo_distributed) for c in g_cls.chunk(2))
            total = total + cfg.koleo_weight * parts["koleo"]
        if self.gram_active(step):
            from pretrain.losses.gram import gram_loss

            with torch.no_grad():
                gram_in = batch.get("gram_crops", g)
                gram_patches = self.gram_teacher["backbone"].forward_features(gram_in)["x_norm_patchtokens"]
                if gram_in.shape[-1] != g.shape[-1]:  # higher-resolution Gram teacher: features to the student grid
                    gram_patches = resize_patch_grid(gram_patches, gram_in.shape[-2:], g.shape[-2:])
            parts["gram"] = gram_loss(outs[0]["x_norm_patchtokens"], gram_patches, cfg.gram_clamp)
            total = total + cfg.gram_weight * parts["gram"]
        parts["total"] = total
        extras = {"teacher_cls_logits": teacher["cls_logits"], "teacher_probs": teacher["dino_probs"],
                  "student_cls_logits": s_cls_logits[:n_global], "student_cls": outs[0]["x_norm_clstoken"],
                  "teacher_cls": teacher["cls"]}
        return total, {"losses": {k: v.detach() for k, v in parts.items()}, "extras": extras}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- m * teacher + (1 - m) * student`` on local shards (no communication)."""
        ema_update_(self.teacher.parameters(), self.student.parameters(), momentum)
