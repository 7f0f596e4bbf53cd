"""``method = "simclr"``: SimCLR v1 (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations") and v2 (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners"),
``simclr.version = 1 | 2``.

- Views: two per image, each a random resized crop (scale 0.08-1), horizontal flip, colour distortion of strength
  ``s`` (jitter of brightness/contrast/saturation 0.8 s and hue 0.2 s in random order with p = 0.8, grayscale
  with p = 0.2) and Gaussian blur with p = 0.5 (sigma 0.1-2; ImageNet; ``blur = false`` for CIFAR-size data),
  made by the shared multi-crop code (``pretrain.data.augment``) with no local crops and no solarisation.
- Model: a ResNet encoder f (pooled feature h) and a projection MLP g with BN: 2 layers (v1: D -> D -> 128)
  or 3 layers (v2: D -> D -> D -> 128); hidden layers Linear + BN + ReLU, the last Linear + BN (released code).
- Loss: NT-Xent over the 2N' views of the global batch (``pretrain.losses.contrastive.nt_xent``: negatives gathered
  across ranks with gradients), temperature ``simclr.temperature``.
- Global BN: every batch norm aggregates mean and variance over all ranks (:class:`GlobalBatchNorm`, which works
  on CPU/gloo too, unlike ``nn.SyncBatchNorm``).
- Optimizer: LARS (``pretrain.optim_lars``; momentum 0.9, trust coefficient 0.001); biases and BN parameters
  (every 1-D parameter of a ResNet + MLP) get no weight decay and no trust-ratio adaptation.
- Export: ``backbone.pth`` (torchvision layout + sidecar) and ``projection_head.pth``; v2 also writes
  ``finetune_head_layer.pth``, the first projection layer, which with the backbone is v2's documented
  fine-tuning start (:func:`build_finetune_start`).
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
from pretrain.config import TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.data.masking import MaskingConfig
from pretrain.layers.global_bn import convert_global_bn
from pretrain.losses.contrastive import nt_xent
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.dinov2 import export_backbone_with_config
from pretrain.models import build_backbone, is_resnet
from pretrain.optim import ScheduleValues
from pretrain.optim_lars import LARS, lars_param_groups

__all__ = ["SimCLRConfig", "SimCLRMethod", "SimCLRSection", "build_finetune_start", "projection_head",
           "simclr_crops"]

logger = logging.getLogger("pretrain")


@dataclasses.dataclass(kw_only=True)
class SimCLRSection:
    """SimCLR's own settings (defaults: v1 with a ResNet-50)."""

    version: int = 1
    """1: 2-layer projection head; 2: 3-layer head, fine-tuning starts from its first layer."""
    backbone: str = "resnet50"
    """A ResNet name of ``pretrain.models`` (``resnet50``, ``resnet18_small``, ...)."""
    backbone_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``ResNetConfig`` overrides (``width``, ``zero_init_residual``, ...)."""
    hidden_dim: int = 0
    """Width of the head's hidden layers; 0 = the backbone's feature width (2048 for a ResNet-50, as the papers)."""
    out_dim: int = 128
    """Projection output width (128 in both papers)."""
    temperature: float = 0.5
    """NT-Xent temperature (v1: 0.1 best at batch 4096 on ImageNet, Table 5; 0.5 for CIFAR-10 / small batches)."""
    color_strength: float = 1.0
    """Colour distortion strength s (1.0 on ImageNet, 0.5 on CIFAR-10)."""
    blur: bool = True
    """Gaussian blur with p = 0.5 (ImageNet); off for CIFAR-size images as in the paper's CIFAR-10 runs."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area range."""
    global_bn: bool = True
    """Batch statistics over all ranks in every BN (SimCLR's global BN); False keeps per-rank statistics."""
    optimizer: str = "lars"
    """'lars' (the papers) or 'trainer' (``train.optimizer``: AdamW or plain SGD)."""
    lars_momentum: float = 0.9
    """LARS momentum."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient eta."""

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"simclr.version must be 1 or 2, got {self.version}")
        if not is_resnet(self.backbone):
            raise ValueError(f"simclr.backbone must be a ResNet name (resnet50, resnet18_small, ...), "
                             f"got {self.backbone!r}")
        if self.hidden_dim < 0 or self.out_dim < 1:
            raise ValueError(f"simclr.hidden_dim must be >= 0 and out_dim >= 1, got {self.hidden_dim}, "
                             f"{self.out_dim}")
        if not self.temperature > 0:
            raise ValueError(f"simclr.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.color_strength <= 2.5:
            raise ValueError(f"simclr.color_strength must be in [0, 2.5], got {self.color_strength}")
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        if self.optimizer not in ("lars", "trainer"):
            raise ValueError(f"simclr.optimizer must be 'lars' or 'trainer', got {self.optimizer!r}")
        if not 0.0 <= self.lars_momentum < 1.0 or not self.trust_coefficient > 0:
            raise ValueError(f"simclr.lars_momentum must be in [0, 1) and trust_coefficient > 0, got "
                             f"{self.lars_momentum}, {self.trust_coefficient}")


@dataclasses.dataclass(kw_only=True)
class SimCLRConfig(TrainConfig):
    """A SimCLR run: the shared sections plus ``simclr``."""

    name: str = "simclr"
    """Run name (logs)."""
    method: str = "simclr"
    """The training method (this class: 'simclr')."""
    simclr: SimCLRSection = dataclasses.field(default_factory=SimCLRSection)
    """Version, encoder, head, temperature, augmentation strength, global BN, LARS."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phases:
            raise ValueError("phases: SimCLR has a single phase; remove the [[phases]] entries")


def simclr_crops(crops: MultiCropConfig, s: SimCLRSection) -> MultiCropConfig:
    """SimCLR's augmentation on ``crops`` (which keeps the size, aspect ratios, flip, blur sigmas, mean/std)."""
    blur_p = 0.5 if s.blur else 0.0
    c = 0.8 * s.color_strength
    return dataclasses.replace(
        crops, n_local=0, global_scale=s.crop_scale, jitter_p=0.8, brightness=c, contrast=c, saturation=c,
        hue=0.2 * s.color_strength, grayscale_p=0.2, blur_p_global1=blur_p, blur_p_global2=blur_p,
        solarize_p=0.0, official_blur_inversion=False)


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, layers: int) -> nn.Sequential:
    """``layers`` - 1 blocks of Linear (no bias) + BN + ReLU, then Linear (no bias) + BN; ``head[0]`` is the
    first layer (v2's fine-tuning start)."""
    blocks: list[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        blocks.append(nn.Sequential(nn.Linear(d, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU()))
        d = hidden_dim
    blocks.append(nn.Sequential(nn.Linear(d, out_dim, bias=False), nn.BatchNorm1d(out_dim)))
    return nn.Sequential(*blocks)


@register_method
class SimCLRMethod(Method):
    """ResNet + projection MLP trained with NT-Xent and LARS (see the module docstring)."""

    name = "simclr"
    config_class = SimCLRConfig
    cfg: SimCLRConfig
    arch: nn.ModuleDict

    def build(self) -> nn.ModuleDict:
        s = self.cfg.simclr
        backbone = build_backbone(s.backbone, **s.backbone_overrides)
        dim = backbone.cfg.embed_dim
        head = projection_head(dim, s.hidden_dim or dim, s.out_dim, 2 if s.version == 1 else 3)
        arch = nn.ModuleDict({"backbone": backbone, "head": head})
        return convert_global_bn(arch) if s.global_bn else arch

    def parts(self) -> list[Part]:
        return [Part("model", self.arch, "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        c = simclr_crops(crops, self.cfg.simclr)
        return Views(crops=c, patch_size=c.global_size, masking=MaskingConfig(mask_probability=0.0))

    def param_groups(self) -> list[dict[str, Any]]:
        """Weights (decayed, LARS-adapted) and biases + BN parameters (neither), as SimCLR's exclusion list."""
        return lars_param_groups(self.arch)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.arch["backbone"], "head": self.arch["head"]}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        s = self.cfg.simclr
        if s.optimizer == "lars":
            return LARS(groups, momentum=s.lars_momentum, trust_coefficient=s.trust_coefficient)
        return super().build_optimizer(groups)

    def embed(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, z)``: pooled backbone features and projections of ``crops`` (one forward, so BN sees them all)."""
        h = self.arch["backbone"](crops)
        return h, self.arch["head"](h)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        crops = batch["global_crops"]  # crop-major: every image's first view, then every second view
        _, z = self.embed(crops)
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, self.cfg.simclr.temperature)
        return loss, {"losses": {"nt_xent": loss.detach(), "total": loss.detach()},
                      "extras": {"z1": z1.detach(), "z2": z2.detach()}}

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Mean cosine of positive pairs, per-dimension std of the normalised projections (collapse: -> 0) and the
        local top-1 accuracy of finding the partner view among this rank's views."""
        a, b = F.normalize(out["extras"]["z1"], dim=1), F.normalize(out["extras"]["z2"], dim=1)
        sim = a @ b.T
        acc = (sim.argmax(1) == torch.arange(len(a), device=a.device)).float().mean()
        return {"pos_cos": float(sim.diagonal().mean()), "z_std": float(a.std(0).mean()), "pair_acc": float(acc)}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (+ ``.json``), ``projection_head.pth`` and, for v2, ``finetune_head_layer.pth``."""
        sd = full_state_dict(self.arch)
        if not is_main:
            return
        s = self.cfg.simclr
        out.mkdir(parents=True, exist_ok=True)
        export_backbone_with_config(sd, out / "backbone.pth", name=s.backbone, backbone=self.arch["backbone"],
                                    extra={"method": "simclr", "version": s.version})
        head = {k.removeprefix("head."): v.cpu() for k, v in sd.items() if k.startswith("head.")}
        torch.save(head, out / "projection_head.pth")
        if s.version == 2:
            first = {k.removeprefix("0."): v for k, v in head.items() if k.startswith("0.")}
            torch.save(first, out / "finetune_head_layer.pth")
        logger.info("exported SimCLR v%d backbone and projection head to %s", s.version, out)

    def summary(self) -> str:
        n = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in self.arch.items()}
        s = self.cfg.simclr
        return (f"SimCLR v{s.version}: {s.backbone} {n['backbone']:.2f}M + projection head {n['head']:.2f}M, "
                f"T={s.temperature}, {'global' if s.global_bn else 'per-rank'} BN, {s.optimizer}")


def build_finetune_start(export_dir: str | Path) -> nn.Sequential:
    """SimCLR v2's fine-tuning start from an export: the backbone followed by the first projection layer
    (Linear + BN + ReLU, plain batch norm), ready for a task head on top."""
    export_dir = Path(export_dir)
    backbone = build_backbone(None, weights=str(export_dir / "backbone.pth"))
    layer = torch.load(export_dir / "finetune_head_layer.pth", weights_only=True)
    hidden, dim = layer["0.weight"].shape
    first = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU())
    first.load_state_dict(layer)
    return nn.Sequential(backbone, first)
