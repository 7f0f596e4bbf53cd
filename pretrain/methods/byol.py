"""``method = "byol"``: Bootstrap Your Own Latent (Grill et al. 2020, "Bootstrap your own latent: A new approach to
self-supervised learning").

- Views: two per image (the loader's two global crops): random resized crop 0.08-1, flip, colour jitter
  (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale 0.2, Gaussian blur with p = 1.0 on the first view and 0.1 on the
  second, solarisation with p = 0 / 0.2 (the shared multi-crop code solarises the second global crop only); set
  by the recipe.
- Modules: the online network (ResNet backbone + projector MLP 2048 -> 4096 -> 256: Linear, BN, ReLU, Linear) and
  the predictor (same MLP shape, 256 -> 4096 -> 256), both trained; the target network (backbone + projector), an
  'ema' part of the online one whose momentum tau follows the cosine schedule ``schedule.momentum_teacher``
  (0.996) -> ``final_momentum_teacher`` (1). Every BN (backbone, projector, predictor) takes its statistics over
  the global batch (:class:`GlobalBatchNorm`; the paper uses cross-replica BN). The target runs in training mode
  (batch statistics), as the paper's.
- Loss: ``p_i = predictor(projector(backbone(v_i)))``, ``z'_i`` the target's projection of view i (each view
  through the networks separately), ``L = mean(2 - 2 cos(p_1, sg(z'_2))) + mean(2 - 2 cos(p_2, sg(z'_1)))``.
- Optimizer: LARS (``pretrain.optim_lars``, momentum 0.9, trust coefficient 0.001), biases and BN parameters
  excluded from weight decay and from the adaptation (wd 1.5e-6 on the rest). The EMA update runs after the
  optimizer step.
- Export: ``backbone.pth`` (online backbone, torchvision layout + sidecar) and ``target_backbone.pth``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.layers.global_bn import convert_global_bn
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.moco import backbone_dim, export_encoders, plain_param_groups
from pretrain.optim import ScheduleValues
from pretrain.optim_lars import LARS, lars_param_groups
from pretrain.ssl.meta_arch import BackboneConfig

__all__ = ["BYOLArch", "BYOLConfig", "BYOLMethod", "BYOLSection", "byol_mlp", "normalized_mse"]


@dataclasses.dataclass(kw_only=True)
class BYOLSection:
    """BYOL settings (defaults: the paper's ImageNet values)."""

    dim: int = 256
    """Output width of the projector and the predictor."""
    mlp_dim: int = 4096
    """Hidden width of the projector and the predictor."""
    global_bn: bool = True
    """Batch statistics over all ranks in every BN (the paper's cross-replica BN); False: per-rank statistics."""
    optimizer: str = "lars"
    """'lars' (the paper) or 'trainer' (``train.optimizer``: AdamW or SGD with momentum 0.9)."""
    lars_momentum: float = 0.9
    """LARS momentum."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient eta."""

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"byol.dim must be >= 1, got {self.dim}")
        if self.mlp_dim < 1:
            raise ValueError(f"byol.mlp_dim must be >= 1, got {self.mlp_dim}")
        if self.optimizer not in ("lars", "trainer"):
            raise ValueError(f"byol.optimizer must be 'lars' or 'trainer', got {self.optimizer!r}")
        if not 0.0 <= self.lars_momentum < 1.0:
            raise ValueError(f"byol.lars_momentum must be in [0, 1), got {self.lars_momentum}")
        if not self.trust_coefficient > 0:
            raise ValueError(f"byol.trust_coefficient must be > 0, got {self.trust_coefficient}")


@dataclasses.dataclass(kw_only=True)
class BYOLConfig(TrainConfig):
    """A BYOL run: the shared sections plus ``backbone`` and ``byol``."""

    name: str = "byol"
    """Run name (logs)."""
    method: str = "byol"
    """The training method (this class: 'byol')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet50"))
    """Encoder backbone (a ResNet-50 in the paper)."""
    byol: BYOLSection = dataclasses.field(default_factory=BYOLSection)
    """Projector / predictor widths, global BN, LARS."""
    data: DataConfig
    """Shards and crops (the two global crops are the views)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phases:
            raise ValueError("phases: BYOL has a single phase; remove the [[phases]] entries")


def byol_mlp(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear, BN, ReLU, Linear (with biases, as the paper's MLPs)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out))


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mean_i ||p_i/|p_i| - z_i/|z_i|||^2 = mean_i (2 - 2 cos(p_i, z_i))`` in fp32 (no gradient into ``z``)."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(1)).mean()


class BYOLArch(nn.Module):
    """Online network (backbone + projector), predictor and the target network (a copy of the online one)."""

    def __init__(self, backbone: BackboneConfig, cfg: BYOLSection) -> None:
        super().__init__()
        net = backbone.build()
        self.online = nn.ModuleDict({"backbone": net, "projector": byol_mlp(backbone_dim(net), cfg.mlp_dim, cfg.dim)})
        self.predictor = byol_mlp(cfg.dim, cfg.mlp_dim, cfg.dim)
        if cfg.global_bn:
            convert_global_bn(self.online)
            convert_global_bn(self.predictor)
        self.target = copy.deepcopy(self.online)

    @staticmethod
    def project(net: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        """``projector(backbone(x))``."""
        return net["projector"](net["backbone"](x))


@register_method
class BYOLMethod(Method):
    """BYOL (see the module docstring)."""

    name = "byol"
    config_class = BYOLConfig
    cfg: BYOLConfig
    arch: BYOLArch

    def build(self) -> BYOLArch:
        return BYOLArch(self.cfg.backbone, self.cfg.byol)

    def parts(self) -> list[Part]:
        arch = self.arch
        return [Part("online", arch.online, "trained"), Part("predictor", arch.predictor, "trained"),
                Part("target", arch.target, "ema", ema_of="online")]

    def train_mode(self) -> None:
        """Everything in training mode: the target's BNs use batch statistics, as the paper's."""
        self.arch.train()

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0),
                     patch_size=getattr(self.arch.online["backbone"], "patch_size", 1))

    def param_groups(self) -> list[dict[str, Any]]:
        """LARS: weights (decayed, adapted) and biases + BN parameters (neither); otherwise one plain group."""
        if self.cfg.byol.optimizer == "lars":
            return lars_param_groups(nn.ModuleList([self.arch.online, self.arch.predictor]))
        return plain_param_groups(self.arch.online, self.arch.predictor)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"online": self.arch.online, "predictor": self.arch.predictor}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        s = self.cfg.byol
        if s.optimizer == "lars":
            return LARS(groups, momentum=s.lars_momentum, trust_coefficient=s.trust_coefficient)
        if self.cfg.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
        return super().build_optimizer(groups)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        arch = self.arch
        v1, v2 = batch["global_crops"].chunk(2)  # crop-major: every image's first view, then every second view
        p1, p2 = (arch.predictor(arch.project(arch.online, v)) for v in (v1, v2))
        with torch.no_grad():
            z1, z2 = (arch.project(arch.target, v).float() for v in (v1, v2))
        loss = normalized_mse(p1, z2) + normalized_mse(p2, z1)
        return loss, {"losses": {"byol": loss.detach(), "total": loss.detach()},
                      "extras": {"p": p1.detach().float(), "z": z2}}

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Mean cosine of prediction and target, and the per-dimension std of the normalised target projections
        x sqrt(dim) (~1 healthy, 0: collapse)."""
        p, z = F.normalize(out["extras"]["p"], dim=1), F.normalize(out["extras"]["z"], dim=1)
        return {"pos_cos": float((p * z).sum(1).mean()), "z_std": float(z.std(0).mean() * z.shape[1] ** 0.5)}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (online network) and ``target_backbone.pth`` (+ ``.json`` sidecars)."""
        export_encoders(out, {"backbone.pth": self.arch.online, "target_backbone.pth": self.arch.target},
                        name=self.cfg.backbone.name, is_main=is_main)

    def summary(self) -> str:
        s = self.cfg.byol
        n = sum(p.numel() for m in (self.arch.online, self.arch.predictor) for p in m.parameters())
        return (f"BYOL: {self.cfg.backbone.name} + projector/predictor {s.mlp_dim}->{s.dim} ({n / 1e6:.2f}M trained "
                f"params), {'global' if s.global_bn else 'per-rank'} BN, {s.optimizer}")
