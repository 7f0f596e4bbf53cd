"""``method = "simsiam"``: SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning").

- Views: two per image (the loader's two global crops) with MoCo v2's augmentation: random resized crop 0.2-1,
  colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale 0.2, Gaussian blur (sigma 0.1-2) with p = 0.5,
  flip; set by the recipe.
- Encoder f: a ResNet backbone and a 3-layer projection MLP (hidden and output width 2048): BN on every fc layer
  including the output one (which has no ReLU; its BN has no affine parameters, as the released code), ReLU on the
  hidden ones, no biases (every fc is followed by BN). Predictor h: a 2-layer bottleneck MLP 2048 -> 512 -> 2048
  with BN + ReLU on the hidden layer and a plain (biased) output fc.
- Loss: ``L = D(p_1, sg(z_2)) / 2 + D(p_2, sg(z_1)) / 2`` with ``D`` the negative cosine similarity, ``z_i = f(v_i)``,
  ``p_i = h(z_i)``; each view through the networks separately. No momentum encoder, no negatives.
- Optimizer: SGD with momentum 0.9, weight decay 1e-4 on every parameter, lr 0.05 x batch / 256 with a cosine
  decay; the predictor's lr is fixed at the peak lr (``simsiam.fix_pred_lr``: its param group carries
  ``fix_lr`` and :meth:`SimSiamMethod.adjust_lr` sets it after the schedules). Every BN takes its statistics over
  the global batch (:class:`GlobalBatchNorm`; the released code uses SyncBN).
- Export: ``backbone.pth`` (torchvision layout + sidecar) and ``projector.pth``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import full_state_dict
from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.layers.global_bn import convert_global_bn
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.dinov2 import export_backbone_with_config
from pretrain.methods.moco import backbone_dim
from pretrain.optim import ScheduleValues, build_optimizer
from pretrain.ssl.meta_arch import BackboneConfig

__all__ = ["SimSiamConfig", "SimSiamMethod", "SimSiamSection", "negative_cosine", "predictor_mlp",
           "projection_mlp"]

logger = logging.getLogger("pretrain")


@dataclasses.dataclass(kw_only=True)
class SimSiamSection:
    """SimSiam settings (defaults: the paper's ImageNet values)."""

    dim: int = 2048
    """Output width of the projector (and of the predictor)."""
    hidden_dim: int = 0
    """Hidden width of the projector; 0 = the backbone's feature width (2048 for a ResNet-50, as the paper)."""
    pred_dim: int = 512
    """Bottleneck width of the predictor."""
    fix_pred_lr: bool = True
    """Keep the predictor's lr at the peak lr instead of decaying it (the paper's default)."""
    global_bn: bool = True
    """Batch statistics over all ranks in every BN (the released code's SyncBN); False: per-rank statistics."""
    sgd_momentum: float = 0.9
    """Momentum of SGD (with ``train.optimizer = "sgd"``)."""

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"simsiam.dim must be >= 1, got {self.dim}")
        if self.hidden_dim < 0:
            raise ValueError(f"simsiam.hidden_dim must be >= 0, got {self.hidden_dim}")
        if self.pred_dim < 1:
            raise ValueError(f"simsiam.pred_dim must be >= 1, got {self.pred_dim}")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise ValueError(f"simsiam.sgd_momentum must be in [0, 1), got {self.sgd_momentum}")


@dataclasses.dataclass(kw_only=True)
class SimSiamConfig(TrainConfig):
    """A SimSiam run: the shared sections plus ``backbone`` and ``simsiam``."""

    name: str = "simsiam"
    """Run name (logs)."""
    method: str = "simsiam"
    """The training method (this class: 'simsiam')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet50"))
    """Encoder backbone (a ResNet-50 in the paper)."""
    simsiam: SimSiamSection = dataclasses.field(default_factory=SimSiamSection)
    """Projector / predictor widths, fixed predictor lr, global BN."""
    data: DataConfig
    """Shards and crops (the two global crops are the views)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phases:
            raise ValueError("phases: SimSiam has a single phase; remove the [[phases]] entries")


def projection_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """SimSiam's projector: (Linear + BN + ReLU) x 2, then Linear + BN without affine parameters; no biases."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False))


def predictor_mlp(dim: int, pred_dim: int) -> nn.Sequential:
    """SimSiam's bottleneck predictor: Linear (no bias) + BN + ReLU, then a plain Linear."""
    return nn.Sequential(nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
                         nn.Linear(pred_dim, dim))


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``D(p, sg(z)) = -mean_i cos(p_i, z_i)`` in fp32 (no gradient into ``z``)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


@register_method
class SimSiamMethod(Method):
    """SimSiam (see the module docstring)."""

    name = "simsiam"
    config_class = SimSiamConfig
    cfg: SimSiamConfig
    arch: nn.ModuleDict

    def build(self) -> nn.ModuleDict:
        s = self.cfg.simsiam
        net = self.cfg.backbone.build()
        width = backbone_dim(net)
        encoder = nn.ModuleDict({"backbone": net, "projector": projection_mlp(width, s.hidden_dim or width, s.dim)})
        arch = nn.ModuleDict({"encoder": encoder, "predictor": predictor_mlp(s.dim, s.pred_dim)})
        return convert_global_bn(arch) if s.global_bn else arch

    def parts(self) -> list[Part]:
        return [Part("encoder", self.arch["encoder"], "trained"), Part("predictor", self.arch["predictor"], "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0),
                     patch_size=getattr(self.arch["encoder"]["backbone"], "patch_size", 1))

    def param_groups(self) -> list[dict[str, Any]]:
        """The encoder's and the predictor's parameters (weight decay on all); the predictor's group has
        ``fix_lr`` = ``simsiam.fix_pred_lr``."""
        groups = []
        for name in ("encoder", "predictor"):
            params = [p for p in self.arch[name].parameters() if p.requires_grad]
            groups.append({"params": params, "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False,
                           "fix_lr": name == "predictor" and self.cfg.simsiam.fix_pred_lr,
                           "n_params": sum(p.numel() for p in params)})
        return groups

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.arch["encoder"], "predictor": self.arch["predictor"]}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.cfg.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=self.cfg.simsiam.sgd_momentum)
        return build_optimizer(groups, self.cfg.optim)

    def peak_lr(self) -> float:
        """The schedule's peak lr for this run's global batch (``base_lr`` x sqrt(batch / reference))."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        s = self.cfg.schedule
        return s.base_lr * math.sqrt(self.cfg.data.shards.batch_size * world / s.lr_reference_batch)

    def adjust_lr(self, optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
        """Groups marked ``fix_lr`` (the predictor) keep the peak lr: not warmed up, not decayed."""
        for group in optimizer.param_groups:
            if group.get("fix_lr", False):
                group["lr"] = self.peak_lr() * group.get("lr_multiplier", 1.0)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        encoder, predictor = self.arch["encoder"], self.arch["predictor"]
        v1, v2 = batch["global_crops"].chunk(2)  # crop-major: every image's first view, then every second view
        z1, z2 = (encoder["projector"](encoder["backbone"](v)) for v in (v1, v2))
        p1, p2 = predictor(z1), predictor(z2)
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        return loss, {"losses": {"simsiam": loss.detach(), "total": loss.detach()},
                      "extras": {"z": z1.detach().float(), "p": p1.detach().float()}}

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """The paper's collapse monitor (Fig. 2): per-dimension std of the l2-normalised projections, x sqrt(dim)
        (~1 for a spread-out output, 0 when collapsed), and the mean cosine of a prediction with its own z."""
        z, p = F.normalize(out["extras"]["z"], dim=1), F.normalize(out["extras"]["p"], dim=1)
        return {"z_std": float(z.std(0).mean() * z.shape[1] ** 0.5), "pz_cos": float((p * z).sum(1).mean())}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (+ ``.json`` sidecar) and ``projector.pth``."""
        sd = full_state_dict(self.arch["encoder"])  # collective: every rank
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        export_backbone_with_config(sd, out / "backbone.pth", name=self.cfg.backbone.name,
                                    backbone=self.arch["encoder"]["backbone"], extra={"method": "simsiam"})
        torch.save({k.removeprefix("projector."): v.cpu() for k, v in sd.items() if k.startswith("projector.")},
                   out / "projector.pth")
        logger.info("exported backbone.pth and projector.pth to %s", out)

    def summary(self) -> str:
        s = self.cfg.simsiam
        n = sum(p.numel() for p in self.arch.parameters())
        return (f"SimSiam: {self.cfg.backbone.name} + projector ->{s.dim}, predictor {s.dim}->{s.pred_dim}->{s.dim} "
                f"({n / 1e6:.2f}M params), predictor lr {'fixed' if s.fix_pred_lr else 'scheduled'}, "
                f"{'global' if s.global_bn else 'per-rank'} BN")
