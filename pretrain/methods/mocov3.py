"""``method = "mocov3"``: MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers").

Modules: the query encoder (ViT backbone + 3-layer projector MLP, 4096 hidden, 256-d, BN after every layer,
the last one without affine parameters) and a 2-layer predictor MLP, both trained; the momentum encoder
(backbone + projector), an 'ema' part whose momentum follows the cosine schedule ``schedule.momentum_teacher``
(0.99) -> ``final_momentum_teacher`` (1). There is no queue: the keys of the other images of the global batch
(gathered across ranks) are the negatives. The projector and predictor BatchNorms take their statistics over the
global batch (:class:`pretrain.layers.global_bn.GlobalBatchNorm`; the paper uses SyncBN). With
``mocov3.freeze_patch_embed`` (the paper's stability fix) the patch embedding keeps its random initialisation:
it gets no gradient and is not in the optimizer.

Loss: ``q_i = predictor(projector(backbone(x_i)))``, ``k_i`` the momentum encoder's projection of view i (each
view through the networks separately, as the paper), ``L = 2T (ctr(q1, k2) + ctr(q2, k1))`` with ``ctr`` the
InfoNCE of normalised queries against every key of the global batch (:func:`pretrain.losses.contrastive.info_nce`
with ``negatives=None``), T = 0.2. The momentum update runs after the optimizer step (the paper's code runs it
before the next forward: the same sequence of weights). Export: ``backbone.pth`` and ``key_backbone.pth``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.layers.global_bn import GlobalBatchNorm
from pretrain.losses.contrastive import info_nce
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.dinov2 import vit_flops
from pretrain.methods.moco import backbone_dim, export_encoders, plain_param_groups
from pretrain.models import ViTConfig
from pretrain.optim import ScheduleValues, build_optimizer
from pretrain.ssl.meta_arch import BackboneConfig

__all__ = ["MoCoV3Arch", "MoCoV3Config", "MoCoV3Method", "MoCoV3Section", "mlp"]


@dataclasses.dataclass(kw_only=True)
class MoCoV3Section:
    """MoCo v3 settings (defaults: the paper's ViT values)."""

    dim: int = 256
    """Output width of the projector and predictor."""
    mlp_dim: int = 4096
    """Hidden width of the projector and predictor."""
    temperature: float = 0.2
    """InfoNCE temperature (the loss is also multiplied by 2 T, as the paper's code)."""
    freeze_patch_embed: bool = True
    """Keep the random patch embedding fixed (the paper's "random patch projection" for stability)."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.mlp_dim < 1 or self.temperature <= 0:
            raise ValueError(f"mocov3.dim and mocov3.mlp_dim must be >= 1 and mocov3.temperature > 0, got "
                             f"{self.dim}, {self.mlp_dim}, {self.temperature}")


@dataclasses.dataclass(kw_only=True)
class MoCoV3Config(TrainConfig):
    """A MoCo v3 run: the shared sections plus ``backbone`` and ``mocov3``."""

    name: str = "mocov3"
    """Run name (logs)."""
    method: str = "mocov3"
    """The training method (this class: 'mocov3')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    """Encoder backbone (a ViT in the paper; any of ``pretrain.models.backbone_names()`` works)."""
    mocov3: MoCoV3Section = dataclasses.field(default_factory=MoCoV3Section)
    """Projector / predictor widths, temperature, frozen patch embedding."""
    data: DataConfig
    """Shards and crops (two global crops are used)."""


def mlp(layers: int, in_dim: int, hidden: int, out: int, *, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP: ``layers`` bias-free linear layers, global-batch BN + ReLU between them, and a BN without
    affine parameters after the last one when ``last_bn``."""
    mods: list[nn.Module] = []
    for i in range(layers):
        d_in, d_out = in_dim if i == 0 else hidden, out if i == layers - 1 else hidden
        mods.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            mods += [GlobalBatchNorm(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            mods.append(GlobalBatchNorm(d_out, affine=False))
    return nn.Sequential(*mods)


class MoCoV3Arch(nn.Module):
    """Query encoder (backbone + projector), predictor and the momentum encoder (a copy of the query encoder)."""

    def __init__(self, backbone: BackboneConfig, cfg: MoCoV3Section) -> None:
        super().__init__()
        net = backbone.build()
        projector = mlp(3, backbone_dim(net), cfg.mlp_dim, cfg.dim, last_bn=True)
        self.query = nn.ModuleDict({"backbone": net, "projector": projector})
        self.predictor = mlp(2, cfg.dim, cfg.mlp_dim, cfg.dim, last_bn=False)
        self.key = copy.deepcopy(self.query)
        if cfg.freeze_patch_embed:
            patch_embed = getattr(net, "patch_embed", None)
            if patch_embed is None:
                raise ValueError(f"mocov3.freeze_patch_embed: {backbone.name} has no patch_embed (a ViT has)")
            patch_embed.requires_grad_(False)

    @staticmethod
    def project(encoder: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        """``projector(backbone(x))`` in fp32."""
        return encoder["projector"](encoder["backbone"](x)).float()


@register_method
class MoCoV3Method(Method):
    """MoCo v3 (see the module docstring)."""

    name = "mocov3"
    config_class = MoCoV3Config
    cfg: MoCoV3Config
    arch: MoCoV3Arch

    def build(self) -> MoCoV3Arch:
        return MoCoV3Arch(self.cfg.backbone, self.cfg.mocov3)

    def parts(self) -> list[Part]:
        arch = self.arch
        return [Part("query", arch.query, "trained"), Part("predictor", arch.predictor, "trained"),
                Part("key", arch.key, "ema", ema_of="query")]

    def train_mode(self) -> None:
        """Everything in training mode: the momentum encoder's BatchNorms use batch statistics, as the paper's."""
        self.arch.train()

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0),
                     patch_size=getattr(self.arch.query["backbone"], "patch_size", 1))

    def param_groups(self) -> list[dict[str, Any]]:
        """Every trainable parameter (the frozen patch embedding is not), weight decay on all (as the paper)."""
        return plain_param_groups(self.arch.query, self.arch.predictor)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"query": self.arch.query, "predictor": self.arch.predictor}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.cfg.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=0.9)
        return build_optimizer(groups, self.cfg.optim)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        arch, t = self.arch, self.cfg.mocov3.temperature
        x1, x2 = batch["global_crops"].chunk(2)
        q1, q2 = (arch.predictor(arch.project(arch.query, x)).float() for x in (x1, x2))
        with torch.no_grad():
            k1, k2 = arch.project(arch.key, x1), arch.project(arch.key, x2)
        loss = (info_nce(q1, k2, temperature=t) + info_nce(q2, k1, temperature=t)) * (2 * t)
        return loss, {"losses": {"infonce": loss.detach(), "total": loss.detach()},
                      "extras": {"q": q1.detach(), "k": k2}}

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Mean positive cosine and the per-dimension std of the normalised keys (x sqrt(dim); 0: collapse)."""
        q = nn.functional.normalize(out["extras"]["q"], dim=1)
        k = nn.functional.normalize(out["extras"]["k"], dim=1)
        return {"pos_sim": float((q * k).sum(1).mean()), "key_std": float(k.std(0).mean() * k.shape[1] ** 0.5)}

    def flops_per_sample(self, batch: dict[str, Any]) -> float | None:
        """Backbone FLOPs: forward + backward of the query encoder and the momentum forward, on both views."""
        backbone = self.arch.query["backbone"]
        if not isinstance(getattr(backbone, "cfg", None), ViTConfig):
            return None
        g = batch["global_crops"]
        return 4 * vit_flops(backbone, g) / max(g.shape[0] // 2, 1)

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (query encoder) and ``key_backbone.pth`` (momentum encoder)."""
        export_encoders(out, {"backbone.pth": self.arch.query, "key_backbone.pth": self.arch.key},
                        name=self.cfg.backbone.name, is_main=is_main)

    def summary(self) -> str:
        c = self.cfg.mocov3
        n = sum(p.numel() for m in (self.arch.query, self.arch.predictor) for p in m.parameters() if p.requires_grad)
        return (f"MoCo v3: {self.cfg.backbone.name} + projector/predictor {c.mlp_dim}->{c.dim} ({n / 1e6:.2f}M "
                f"trained params), T={c.temperature}, frozen patch embedding {c.freeze_patch_embed}")
