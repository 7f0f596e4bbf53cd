"""``method = "moco"``: MoCo v1 / v2 (He et al. 2020; Chen et al. 2020), ``moco.version`` selects which.

Modules: the query encoder (backbone + projection head: v1 a linear 128-d layer, v2 a 2-layer MLP whose hidden
width is the backbone's, 2048 for ResNet-50), trained; the key encoder, its momentum average (an 'ema' part,
``m`` from ``schedule.momentum_teacher``, 0.999 in the papers, constant when ``final_momentum_teacher`` equals
it), run in training mode like the papers' (its BatchNorms use batch statistics and keep their own running
statistics); and a queue of K normalised keys (a buffer, checkpointed with the model).

One step: the query ``q`` of view 1 and the key ``k`` of view 2 (key encoder, no gradient, under Shuffle-BN:
:func:`pretrain.utils.dist.shuffle_batch`; the identity on one process); InfoNCE over ``[q.k, q.queue]
/ T`` (T = 0.07 in v1, 0.2 in v2). After the optimizer step the key encoder moves towards the query encoder, then
the keys of every rank (gathered in rank order, so the queue is identical on all ranks) replace the oldest
entries, wrapping around. Views: two global crops, no local crops (the recipe sets the paper's augmentations).
Optimizer: SGD with momentum (``moco.sgd_momentum``) when ``train.optimizer = "sgd"``, weight decay on every
parameter. Export: ``backbone.pth`` (query encoder, what MoCo's linear evaluation uses) and ``key_backbone.pth``.
"""

from __future__ import annotations

import copy
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
from pretrain.losses.contrastive import info_nce
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.dinov2 import export_backbone_with_config
from pretrain.optim import ScheduleValues, build_optimizer
from pretrain.ssl.meta_arch import BackboneConfig
from pretrain.utils.dist import gather_batch, shuffle_batch, unshuffle_batch

__all__ = ["MoCoArch", "MoCoConfig", "MoCoMethod", "MoCoSection", "backbone_dim", "export_encoders",
           "plain_param_groups"]

logger = logging.getLogger("pretrain")


@dataclasses.dataclass(kw_only=True)
class MoCoSection:
    """MoCo v1 / v2 settings (defaults: the papers' ImageNet values)."""

    version: int = 2
    """1: linear head, T = 0.07; 2: 2-layer MLP head, T = 0.2 (the recipe adds blur and a cosine lr)."""
    dim: int = 128
    """Key / query dimension."""
    hidden_dim: int = 0
    """Hidden width of the v2 MLP head; 0 = the backbone's feature width (2048 for ResNet-50)."""
    queue_size: int = 65536
    """K: keys kept as negatives (at least the global batch)."""
    temperature: float = 0.0
    """InfoNCE temperature; 0 = the paper's (0.07 for v1, 0.2 for v2)."""
    shuffle_bn: bool = True
    """Shuffle the batch across ranks around the key encoder's forward (identity on one process)."""
    sgd_momentum: float = 0.9
    """Momentum of SGD (with train.optimizer = "sgd")."""

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"moco.version must be 1 or 2, got {self.version}")
        if self.dim < 1 or self.queue_size < 1 or self.hidden_dim < 0:
            raise ValueError(f"moco.dim and moco.queue_size must be >= 1 and moco.hidden_dim >= 0, got "
                             f"{self.dim}, {self.queue_size}, {self.hidden_dim}")
        if self.temperature < 0 or not 0.0 <= self.sgd_momentum < 1.0:
            raise ValueError(f"moco.temperature must be >= 0 and moco.sgd_momentum in [0, 1), got "
                             f"{self.temperature}, {self.sgd_momentum}")

    @property
    def tau(self) -> float:
        """The temperature in use."""
        return self.temperature or (0.07 if self.version == 1 else 0.2)


@dataclasses.dataclass(kw_only=True)
class MoCoConfig(TrainConfig):
    """A MoCo v1/v2 run: the shared sections plus ``backbone`` and ``moco``."""

    name: str = "moco"
    """Run name (logs)."""
    method: str = "moco"
    """The training method (this class: 'moco')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet50"))
    """Encoder backbone (any of ``pretrain.models.backbone_names()``; ResNet-50 in the papers)."""
    moco: MoCoSection = dataclasses.field(default_factory=MoCoSection)
    """Head, queue, temperature, Shuffle-BN."""
    data: DataConfig
    """Shards and crops (two global crops are used)."""


def backbone_dim(backbone: nn.Module) -> int:
    """Feature width of a dinoforge ViT (``embed_dim``) or ResNet (``cfg.embed_dim``)."""
    cfg = getattr(backbone, "cfg", None)
    dim = getattr(cfg, "embed_dim", None) or getattr(backbone, "embed_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"cannot tell the feature width of {type(backbone).__name__}")
    return dim


def plain_param_groups(*modules: nn.Module) -> list[dict[str, Any]]:
    """One group with every trainable parameter of ``modules`` (the MoCo papers decay all of them alike)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [{"params": params, "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False}]


def export_encoders(out: Path, encoders: dict[str, nn.ModuleDict], *, name: str, is_main: bool) -> None:
    """Write ``<file>: encoder["backbone"]`` of each entry of ``encoders`` (official layout + ``.json`` sidecar)."""
    gathered = {file: full_state_dict(enc) for file, enc in encoders.items()}  # collective: every rank
    if not is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    for file, sd in gathered.items():
        export_backbone_with_config(sd, out / file, name=name, backbone=encoders[file]["backbone"])
    logger.info("exported %s to %s", ", ".join(gathered), out)


class MoCoArch(nn.Module):
    """Query encoder, key encoder (its momentum copy), the key queue and its write position."""

    def __init__(self, backbone: BackboneConfig, cfg: MoCoSection) -> None:
        super().__init__()
        net = backbone.build()
        width = backbone_dim(net)
        hidden = cfg.hidden_dim or width
        head = (nn.Linear(width, cfg.dim) if cfg.version == 1 else
                nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cfg.dim)))
        self.query = nn.ModuleDict({"backbone": net, "head": head})
        self.key = copy.deepcopy(self.query)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @staticmethod
    def embed(encoder: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        """The normalised fp32 projection of images ``x`` by ``encoder``."""
        return F.normalize(encoder["head"](encoder["backbone"](x)).float(), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (already gathered from every rank) over the oldest entries, wrapping around."""
        size, n = self.queue.shape[0], keys.shape[0]
        if n > size:
            raise ValueError(f"moco.queue_size ({size}) must be >= the global batch ({n})")
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)


def shuffle_generator(seed: int, step: torch.Tensor) -> torch.Generator:
    """The generator of a step's Shuffle-BN permutation: the same on every rank, and restored by a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + int(step))


@register_method
class MoCoMethod(Method):
    """MoCo v1 / v2 (see the module docstring)."""

    name = "moco"
    config_class = MoCoConfig
    cfg: MoCoConfig
    arch: MoCoArch

    def build(self) -> MoCoArch:
        self._keys: torch.Tensor | None = None
        return MoCoArch(self.cfg.backbone, self.cfg.moco)

    def parts(self) -> list[Part]:
        return [Part("query", self.arch.query, "trained"), Part("key", self.arch.key, "ema", ema_of="query")]

    def train_mode(self) -> None:
        """Everything in training mode: the key encoder's BatchNorms use batch statistics, as in the papers."""
        self.arch.train()

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0),
                     patch_size=getattr(self.arch.query["backbone"], "patch_size", 1))

    def param_groups(self) -> list[dict[str, Any]]:
        return plain_param_groups(self.arch.query)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"query": self.arch.query}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.cfg.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=self.cfg.moco.sgd_momentum)
        return build_optimizer(groups, self.cfg.optim)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised keys of images ``x`` by the key encoder, under Shuffle-BN when enabled (no gradient)."""
        with torch.no_grad():
            if not self.cfg.moco.shuffle_bn:
                return self.arch.embed(self.arch.key, x)
            shuffled, undo = shuffle_batch(x, shuffle_generator(self.cfg.seed, self.arch.steps))
            return unshuffle_batch(self.arch.embed(self.arch.key, shuffled), undo)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        v1, v2 = batch["global_crops"].chunk(2)
        q = self.arch.embed(self.arch.query, v1)
        k = self.keys(v2)
        loss = info_nce(q, k, negatives=self.arch.queue, temperature=self.cfg.moco.tau, normalize=False)
        self._keys = k
        return loss, {"losses": {"infonce": loss.detach(), "total": loss.detach()},
                      "extras": {"q": q.detach(), "k": k}}

    def after_step(self, values: ScheduleValues) -> None:
        """The key encoder's momentum update, then this step's keys of every rank into the queue."""
        super().after_step(values)
        if self._keys is not None:
            self.arch.enqueue(gather_batch(self._keys))
            self._keys = None
        self.arch.steps.add_(1)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Mean positive similarity and the per-dimension std of the keys (x sqrt(dim): ~1 healthy, 0 collapsed)."""
        q, k = out["extras"]["q"], out["extras"]["k"]
        return {"pos_sim": float((q * k).sum(1).mean()), "key_std": float(k.std(0).mean() * k.shape[1] ** 0.5)}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (query encoder) and ``key_backbone.pth`` (momentum encoder)."""
        export_encoders(out, {"backbone.pth": self.arch.query, "key_backbone.pth": self.arch.key},
                        name=self.cfg.backbone.name, is_main=is_main)

    def summary(self) -> str:
        m = self.cfg.moco
        n = sum(p.numel() for p in self.arch.query.parameters())
        return (f"MoCo v{m.version}: {self.cfg.backbone.name} + {'linear' if m.version == 1 else 'MLP'} head "
                f"({n / 1e6:.2f}M params), queue {m.queue_size} x {m.dim}, T={m.tau}, shuffle-BN {m.shuffle_bn}")
