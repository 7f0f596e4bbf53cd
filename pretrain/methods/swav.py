"""``method = "swav"``: SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments").

- Views: multi-crop, the loader's two global crops (224 px, scale 0.14-1) and ``data.crops.n_local`` local crops
  (6 x 96 px, scale 0.05-0.14); colour distortion, grayscale and blur (p = 0.5) are set by the recipe.
- Model: a ResNet (or any ``pretrain.models`` backbone) f, a projection head g (Linear D -> 2048 + BN + ReLU ->
  Linear 128, with biases, as the released code; ``swav.hidden_dim = 0``: one Linear), ``z = g(f(x)) / ||.||``,
  and K prototypes: a bias-free Linear 128 -> K. The backbone runs once per crop resolution, the head once over
  the features of every crop (its BN sees all crops together, as the released code).
- Prototypes are L2-normalised (each row) before every forward, where the released code does it (the start of the
  iteration); they get no update during the first ``swav.freeze_prototypes_iters`` iterations (lr 0 in
  :meth:`SwAVMethod.adjust_lr`: with LARS or SGD, a zero lr leaves the weight and its momentum buffer untouched,
  as the released code's ``p.grad = None``).
- Codes: for each global crop, ``q = sinkhorn_knopp(scores, eps, 3)`` (``pretrain.losses.sinkhorn``: the same
  normalisation as SwAV's ``distributed_sinkhorn`` - Q = exp(scores / eps), total mass 1, then rows over the
  global batch / K and columns / B alternately, times B - with maxima subtracted for stability), no gradient.
- Swapped prediction: ``loss = mean_i mean_{v != i} CE(q_i, softmax(scores_v / T))`` over the two global crops i
  and every crop v (global and local), T = 0.1.
- Queue (small batches): per global crop, the last ``swav.queue_size`` normalised features z of the *global*
  batch (gathered across ranks in rank order, newest first, after each optimizer step from epoch
  ``swav.queue_start_epoch`` on): a buffer, checkpointed, identical on every rank. Once full, its scores under the
  current prototypes join the batch's in Sinkhorn-Knopp; each rank contributes its own contiguous slice of the
  queue, so the global Sinkhorn sees every queued feature exactly once - the same problem as the released code's
  per-rank queues (whose union is the same set), and with 2 processes the same numbers as with one.
- Optimizer: LARS (``pretrain.optim_lars``; momentum 0.9, trust coefficient 0.001, no clipping) over every
  parameter with weight decay, as the released code's apex ``LARC`` around SGD (no exclusion of biases and BN).
- Global BN (the released code's SyncBatchNorm) by default. Export: ``backbone.pth`` (torchvision layout +
  sidecar) and ``swav_head.pth`` (projection head and prototypes).
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
from pretrain.layers.global_bn import convert_global_bn
from pretrain.losses.sinkhorn import sinkhorn_knopp
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.dinov2 import export_backbone_with_config
from pretrain.methods.moco import backbone_dim
from pretrain.optim import ScheduleValues
from pretrain.optim_lars import LARS
from pretrain.ssl.meta_arch import BackboneConfig
from pretrain.utils.dist import gather_batch, rank, world_size

__all__ = ["SwAVArch", "SwAVConfig", "SwAVMethod", "SwAVSection", "swapped_prediction_loss"]

logger = logging.getLogger("pretrain")


@dataclasses.dataclass(kw_only=True)
class SwAVSection:
    """SwAV's own settings (defaults: the paper's ImageNet values, ResNet-50, batch 4096, no queue)."""

    hidden_dim: int = 2048
    """Hidden width of the projection head; 0 = a single Linear (the released ``hidden_mlp = 0``)."""
    out_dim: int = 128
    """Projection (feature) dimension."""
    n_prototypes: int = 3000
    """K, the number of prototypes (3000 on ImageNet)."""
    temperature: float = 0.1
    """T of the predicted assignment ``softmax(scores / T)``."""
    epsilon: float = 0.05
    """Entropic regularisation of Sinkhorn-Knopp: ``Q = exp(scores / epsilon)``."""
    sinkhorn_iters: int = 3
    """Sinkhorn-Knopp iterations."""
    queue_size: int = 0
    """Queued features per global crop, over the global batch (3840 at batch 256 in the paper); 0 = no queue."""
    queue_start_epoch: float = 15
    """Epoch (of ``schedule.epoch_length`` iterations) from which features are queued; used once the queue is full."""
    freeze_prototypes_iters: int = 313
    """Iterations at the start during which the prototypes get lr 0 (313 = one epoch at batch 4096)."""
    global_bn: bool = True
    """Batch statistics over all ranks in every BN (the released code's SyncBatchNorm); False: per rank."""
    optimizer: str = "lars"
    """'lars' (the paper) or 'trainer' (``train.optimizer``: AdamW or plain SGD)."""
    lars_momentum: float = 0.9
    """LARS momentum."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient eta."""

    def __post_init__(self) -> None:
        if self.hidden_dim < 0:
            raise ValueError(f"swav.hidden_dim must be >= 0, got {self.hidden_dim}")
        for name in ("out_dim", "n_prototypes", "sinkhorn_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"swav.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("temperature", "epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"swav.{name} must be > 0, got {getattr(self, name)}")
        for name in ("queue_size", "queue_start_epoch", "freeze_prototypes_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"swav.{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer not in ("lars", "trainer"):
            raise ValueError(f"swav.optimizer must be 'lars' or 'trainer', got {self.optimizer!r}")
        if not 0.0 <= self.lars_momentum < 1.0:
            raise ValueError(f"swav.lars_momentum must be in [0, 1), got {self.lars_momentum}")
        if not self.trust_coefficient > 0:
            raise ValueError(f"swav.trust_coefficient must be > 0, got {self.trust_coefficient}")


@dataclasses.dataclass(kw_only=True)
class SwAVConfig(TrainConfig):
    """A SwAV run: the shared sections plus ``backbone`` and ``swav``."""

    name: str = "swav"
    """Run name (logs)."""
    method: str = "swav"
    """The training method (this class: 'swav')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet50"))
    """Encoder backbone (any of ``pretrain.models.backbone_names()``; ResNet-50 in the paper)."""
    swav: SwAVSection = dataclasses.field(default_factory=SwAVSection)
    """Head, prototypes, Sinkhorn, queue, prototype freeze, LARS."""
    data: DataConfig
    """Shards and multi-crop settings (two global crops, ``n_local`` local crops)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phases:
            raise ValueError("phases: SwAV has a single phase; remove the [[phases]] entries")


def swapped_prediction_loss(scores: torch.Tensor, codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """``mean_i mean_{v != i} -sum_k q_i log softmax(scores_v / T)``, averaged over samples.

    Args:
        scores: (V * B, K) prototype scores of all V crops, crop-major (crop v is rows ``v * B .. v * B + B``).
        codes: the (B, K) codes of the first ``len(codes)`` crops (those that are assigned).
        temperature: T.
    """
    n_assign = len(codes)
    b = codes[0].shape[0]
    n_crops = scores.shape[0] // b
    if n_crops * b != scores.shape[0] or n_crops < 2 or n_assign > n_crops:
        raise ValueError(f"scores ({tuple(scores.shape)}) must hold V >= 2 crops of the codes' batch ({b})")
    logp = F.log_softmax(scores.float() / temperature, dim=1).view(n_crops, b, -1)
    total = scores.new_zeros((), dtype=torch.float32)
    for i, q in enumerate(codes):
        ce = -(q[None].float() * logp).sum(-1).mean(-1)  # (V,): CE of every crop against code i
        total = total + (ce.sum() - ce[i]) / (n_crops - 1)
    return total / n_assign


class SwAVArch(nn.Module):
    """Backbone, projection head, prototypes and (with ``queue_size > 0``) the feature queues."""

    def __init__(self, backbone: BackboneConfig, cfg: SwAVSection) -> None:
        super().__init__()
        self.backbone = backbone.build()
        width = backbone_dim(self.backbone)
        if cfg.hidden_dim:
            self.head: nn.Module = nn.Sequential(
                nn.Linear(width, cfg.hidden_dim), nn.BatchNorm1d(cfg.hidden_dim), nn.ReLU(inplace=True),
                nn.Linear(cfg.hidden_dim, cfg.out_dim))
        else:
            self.head = nn.Linear(width, cfg.out_dim)
        self.prototypes = nn.Linear(cfg.out_dim, cfg.n_prototypes, bias=False)
        self.queue_size = cfg.queue_size
        if cfg.queue_size:
            self.register_buffer("queue", torch.zeros(2, cfg.queue_size, cfg.out_dim))
            self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Rescale every prototype to unit length in place (rows of a dim-0 FSDP2 shard are whole rows)."""
        w = self.prototypes.weight
        local = w.to_local() if callable(getattr(w, "to_local", None)) else w
        local.copy_(F.normalize(local.float(), dim=1).to(local.dtype))

    @property
    def queue_full(self) -> bool:
        """Whether the queue is in use: it exists and every slot holds a feature."""
        return bool(self.queue_size) and int(self.queue_count) >= self.queue_size

    @torch.no_grad()
    def enqueue(self, feats: list[torch.Tensor]) -> None:
        """Put each global crop's features (already gathered from every rank) at the front, dropping the oldest."""
        size = self.queue_size
        for i, f in enumerate(feats):
            n = min(f.shape[0], size)
            self.queue[i] = torch.cat([f[:n].to(self.queue.dtype), self.queue[i, :size - n]])
        self.queue_count.copy_((self.queue_count + feats[0].shape[0]).clamp(max=size))


@register_method
class SwAVMethod(Method):
    """SwAV (see the module docstring)."""

    name = "swav"
    config_class = SwAVConfig
    cfg: SwAVConfig
    arch: SwAVArch

    def build(self) -> nn.Module:
        self._feats: list[torch.Tensor] | None = None
        arch = SwAVArch(self.cfg.backbone, self.cfg.swav)
        return convert_global_bn(arch) if self.cfg.swav.global_bn else arch

    def parts(self) -> list[Part]:
        return [Part("model", self.arch, "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=crops, patch_size=getattr(self.arch.backbone, "patch_size", 1))

    def param_groups(self) -> list[dict[str, Any]]:
        """Everything but the prototypes, then the prototypes (``swav_prototypes``, for the freeze): both decayed
        and LARS-adapted, as the released LARC over SGD."""
        protos = [self.arch.prototypes.weight]
        rest = [p for n, p in self.arch.named_parameters() if p.requires_grad and not n.startswith("prototypes.")]
        return [{"params": ps, "lars": True, "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False,
                 "swav_prototypes": flag, "n_params": sum(p.numel() for p in ps)}
                for ps, flag in ((rest, False), (protos, True))]

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.arch.backbone, "head": self.arch.head, "prototypes": self.arch.prototypes}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        s = self.cfg.swav
        if s.optimizer == "lars":
            return LARS(groups, momentum=s.lars_momentum, trust_coefficient=s.trust_coefficient)
        return super().build_optimizer(groups)

    def adjust_lr(self, optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
        """The prototypes get lr 0 during the first ``swav.freeze_prototypes_iters`` iterations."""
        if values.step < self.cfg.swav.freeze_prototypes_iters:
            for group in optimizer.param_groups:
                if group.get("swav_prototypes", False):
                    group["lr"] = 0.0

    def embed(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None) -> torch.Tensor:
        """Normalised fp32 features z of every crop, global crops first (the backbone once per resolution)."""
        h = self.arch.backbone(global_crops)
        if local_crops is not None and local_crops.numel():
            h = torch.cat([h, self.arch.backbone(local_crops)])
        return F.normalize(self.arch.head(h).float(), dim=1)

    @torch.no_grad()
    def codes(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sinkhorn-Knopp codes of each global crop's (B, K) scores, with this rank's slice of the queue when full."""
        s = self.cfg.swav
        out = []
        for i, sc in enumerate(scores):
            if self.arch.queue_full:
                mine = torch.tensor_split(self.arch.queue[i], world_size())[rank()]
                sc = torch.cat([self.arch.prototypes(mine).float(), sc.float()])
            out.append(sinkhorn_knopp(sc, s.epsilon, s.sinkhorn_iters)[-scores[i].shape[0]:])
        return out

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        self.arch.normalize_prototypes()
        g = batch["global_crops"]  # crop-major: (2B, ...)
        b = g.shape[0] // 2
        z = self.embed(g, batch.get("local_crops"))
        scores = self.arch.prototypes(z).float()
        q = self.codes([scores[:b].detach(), scores[b:2 * b].detach()])
        loss = swapped_prediction_loss(scores, q, self.cfg.swav.temperature)
        start = int(self.cfg.swav.queue_start_epoch * self.cfg.schedule.epoch_length)
        self._feats = [z[:b].detach(), z[b:2 * b].detach()] if self.arch.queue_size and values.step >= start else None
        return loss, {"losses": {"swav": loss.detach(), "total": loss.detach()},
                      "extras": {"q": q, "z": z[:2 * b].detach(), "queue_used": self.arch.queue_full}}

    def after_step(self, values: ScheduleValues) -> None:
        """This step's global-crop features of every rank into the queues (from ``swav.queue_start_epoch`` on)."""
        super().after_step(values)
        if self._feats is not None:
            self.arch.enqueue([gather_batch(f) for f in self._feats])
            self._feats = None

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Fraction of prototypes that are some sample's most likely code (collapse: -> 1 / K), the code entropy
        and how often the two global crops' codes agree on the top prototype."""
        q1, q2 = out["extras"]["q"]
        top1, top2 = q1.argmax(1), q2.argmax(1)
        ent = -(q1 * q1.clamp_min(1e-12).log()).sum(1).mean()
        return {"proto_used": float(torch.unique(top1).numel() / q1.shape[1]), "code_entropy": float(ent),
                "code_agree": float((top1 == top2).float().mean()), "queue_used": float(out["extras"]["queue_used"])}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (+ ``.json``) and ``swav_head.pth`` (``head.*`` and ``prototypes.*``)."""
        sd = full_state_dict(self.arch)
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        export_backbone_with_config(sd, out / "backbone.pth", name=self.cfg.backbone.name,
                                    backbone=self.arch.backbone, extra={"method": "swav"})
        torch.save({k: v.cpu() for k, v in sd.items() if k.startswith(("head.", "prototypes."))},
                   out / "swav_head.pth")
        logger.info("exported SwAV backbone, head and prototypes to %s", out)

    def summary(self) -> str:
        s = self.cfg.swav
        n = sum(p.numel() for p in self.arch.parameters())
        return (f"SwAV: {self.cfg.backbone.name} + head ({n / 1e6:.2f}M params), K={s.n_prototypes}, "
                f"T={s.temperature}, eps={s.epsilon}, queue {s.queue_size}, {s.optimizer}, "
                f"{'global' if s.global_bn else 'per-rank'} BN")
