"""``method = "invaspread"``: invariant and spreading instance features (Ye, Zhang, Yuen, Chang 2019,
"Unsupervised Embedding Learning via Invariant and Spreading Instance Feature").

- Views: two augmented views of every image (the loader's two global crops, no local crops); the released code's
  augmentation (crop 0.2-1, colour jitter 0.4 always, grayscale 0.2, flip) is set by the recipe.
- Model: a ResNet (ResNet-18 with the CIFAR stem in the paper: ``resnet18_small``) and a linear 128-d layer, the
  output L2-normalised. No memory bank, no momentum encoder: the instances of the batch are the classifier.
- Loss: :func:`pretrain.losses.contrastive.invariance_spread_loss`: every view of the global batch (gathered
  across ranks) is an anchor against the other 2N - 1 views; ``-log P(partner)`` makes features invariant to
  the augmentation, ``-sum log(1 - P(other))`` spreads instances apart. T = 0.1. As the released code, the
  candidates are detached (``invaspread.detach_candidates``) and both views are anchors.
- Optimizer: SGD with momentum 0.9, weight decay 5e-4 on every parameter, lr 0.03 x 0.1 from epoch 120.
- Export: ``backbone.pth`` (torchvision layout + sidecar) and ``embedding_head.pth`` (the 128-d layer: the
  paper evaluates k-NN on the normalised 128-d embedding).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import full_state_dict
from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.losses.contrastive import invariance_spread_loss
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.dinov2 import export_backbone_with_config
from pretrain.methods.moco import backbone_dim, plain_param_groups
from pretrain.optim import ScheduleValues, build_optimizer
from pretrain.ssl.meta_arch import BackboneConfig

__all__ = ["InvaSpreadConfig", "InvaSpreadMethod", "InvaSpreadSection"]

logger = logging.getLogger("pretrain")


@dataclasses.dataclass(kw_only=True)
class InvaSpreadSection:
    """InvaSpread settings (defaults: the released CIFAR-10 values)."""

    dim: int = 128
    """Embedding dimension."""
    temperature: float = 0.1
    """Softmax temperature."""
    detach_candidates: bool = True
    """Gradients through the anchors only (the released code); False also through the candidates."""
    sgd_momentum: float = 0.9
    """Momentum of SGD (with train.optimizer = "sgd")."""

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"invaspread.dim must be >= 1, got {self.dim}")
        if self.temperature <= 0:
            raise ValueError(f"invaspread.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise ValueError(f"invaspread.sgd_momentum must be in [0, 1), got {self.sgd_momentum}")


@dataclasses.dataclass(kw_only=True)
class InvaSpreadConfig(TrainConfig):
    """An InvaSpread run: the shared sections plus ``backbone`` and ``invaspread``."""

    name: str = "invaspread"
    """Run name (logs)."""
    method: str = "invaspread"
    """The training method (this class: 'invaspread')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet18_small"))
    """Encoder backbone (a CIFAR-stem ResNet-18 in the paper)."""
    invaspread: InvaSpreadSection = dataclasses.field(default_factory=InvaSpreadSection)
    """Embedding and loss."""
    data: DataConfig
    """Shards and crops (the two global crops are the views)."""


@register_method
class InvaSpreadMethod(Method):
    """InvaSpread (see the module docstring)."""

    name = "invaspread"
    config_class = InvaSpreadConfig
    cfg: InvaSpreadConfig

    def build(self) -> nn.ModuleDict:
        net = self.cfg.backbone.build()
        return nn.ModuleDict({"backbone": net, "head": nn.Linear(backbone_dim(net), self.cfg.invaspread.dim)})

    def parts(self) -> list[Part]:
        return [Part("encoder", self.arch, "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0),
                     patch_size=getattr(self.arch["backbone"], "patch_size", 1))

    def param_groups(self) -> list[dict[str, Any]]:
        return plain_param_groups(self.arch)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.arch}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.cfg.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=self.cfg.invaspread.sgd_momentum)
        return build_optimizer(groups, self.cfg.optim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised fp32 embedding of images ``x``."""
        return F.normalize(self.arch["head"](self.arch["backbone"](x)).float(), dim=1)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        s = self.cfg.invaspread
        z1, z2 = self.embed(batch["global_crops"]).chunk(2)  # one forward over both views, as the released code
        loss = invariance_spread_loss(z1, z2, s.temperature, s.detach_candidates)
        return loss, {"losses": {"invaspread": loss.detach(), "total": loss.detach()},
                      "extras": {"z1": z1.detach(), "z2": z2.detach()}}

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Cosine of the two views of an image and the embedding spread (std x sqrt(dim): ~1 healthy, 0 collapsed)."""
        z1, z2 = out["extras"]["z1"], out["extras"]["z2"]
        return {"pos_cos": float((z1 * z2).sum(1).mean()), "feat_std": float(z1.std(0).mean() * z1.shape[1] ** 0.5)}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (+ sidecar) and ``embedding_head.pth``."""
        sd = full_state_dict(self.arch)  # collective: every rank
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        export_backbone_with_config(sd, out / "backbone.pth", name=self.cfg.backbone.name,
                                    backbone=self.arch["backbone"], extra={"method": "invaspread"})
        torch.save({k.removeprefix("head."): v.cpu() for k, v in sd.items() if k.startswith("head.")},
                   out / "embedding_head.pth")
        logger.info("exported backbone.pth and embedding_head.pth to %s", out)

    def summary(self) -> str:
        s = self.cfg.invaspread
        n = sum(p.numel() for p in self.arch.parameters())
        return (f"InvaSpread: {self.cfg.backbone.name} + linear {s.dim}-d head ({n / 1e6:.2f}M params), T="
                f"{s.temperature}, candidates {'detached' if s.detach_candidates else 'with gradients'}")
