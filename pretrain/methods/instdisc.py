"""``method = "instdisc"``: instance discrimination with a memory bank (Wu et al. 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination").

- Instances: every sample of the shards has a row of the memory bank (:class:`pretrain.data.instances.InstanceIndex`,
  built from the shard headers at start: ``(shard set, key)`` -> row, the key being the curation's uid).
- Model: a ResNet (ResNet-50 / ResNet-18 in the paper) whose classifier is replaced by a linear 128-d layer, the
  output L2-normalised.
- Memory bank: one 128-d unit vector per instance (a buffer, so checkpoints hold it), identical on every rank;
  after each step the entries of the batch move towards the new features, ``v <- normalize(m v + (1 - m) f)``
  with m = 0.5 (the paper's proximal momentum update), every rank's (row, feature) pairs gathered first.
- Loss: NCE (the paper's default): the instance's own entry is the data sample, ``instdisc.noise`` (m = 4096)
  entries drawn uniformly from the other instances are noise (the paper draws from all n; excluding the own entry
  changes nothing at ImageNet scale, m / n = 0.3 %, but keeps small data sets, where the own entry would be drawn
  as noise often, from pushing a feature away from itself), ``P(i|v) = exp(v_i . f / T) / Z`` with T = 0.07 and
  Z estimated once, by Monte Carlo over the first global batch's noise scores, then kept (a checkpointed buffer);
  ``h = P / (P + m / n)``, loss ``-log h(own) - sum log(1 - h(noise))``. ``instdisc.loss = "softmax"`` gives the
  full non-parametric softmax over the bank instead. The noise of step s is drawn for the global batch from a
  generator seeded by (seed, s) and sliced by rank, so any number of processes and a resume draw the same.
- Views: one augmented view per image (the loader's first global crop; the second is not used), the paper's
  augmentation (crop 0.2-1, grayscale 0.2, colour jitter 0.4 always, flip) set by the recipe.
- Optimizer: SGD with momentum 0.9 (``train.optimizer = "sgd"``), weight decay on every parameter.
- Export: ``backbone.pth`` (torchvision layout + sidecar; the 128-d head is not part of it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.data.instances import InstanceIndex
from pretrain.losses.contrastive import MemoryBank, bank_softmax_loss, estimate_nce_log_z, nce_loss
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.moco import backbone_dim, export_encoders, plain_param_groups
from pretrain.optim import ScheduleValues, build_optimizer
from pretrain.ssl.meta_arch import BackboneConfig
from pretrain.utils.dist import gather_batch, rank

__all__ = ["InstDiscArch", "InstDiscConfig", "InstDiscMethod", "InstDiscSection", "noise_rows"]

logger = logging.getLogger("pretrain")


@dataclasses.dataclass(kw_only=True)
class InstDiscSection:
    """InstDisc settings (defaults: the paper's ImageNet values)."""

    dim: int = 128
    """Embedding (and memory bank) dimension."""
    temperature: float = 0.07
    """T of ``exp(v . f / T)``."""
    loss: str = "nce"
    """'nce' (noise-contrastive estimation against ``noise`` sampled entries) or 'softmax' (the whole bank)."""
    noise: int = 4096
    """m: noise entries per instance for NCE."""
    bank_momentum: float = 0.5
    """Proximal update of the bank entries: ``v <- normalize(m v + (1 - m) f)``."""
    z: float = 0.0
    """NCE normaliser Z; 0 = estimated from the first batch and kept (the paper)."""
    proximal: float = 0.0
    """lambda of the paper's proximal regularisation ``lambda ||f_i - v_i||^2`` (features kept near their bank entry
    between visits, which stabilises training); 0 = off, as the released code."""
    index_cache: str = ""
    """File keeping the instance index (``(set, key)`` -> bank row) between starts; "" = scan the shards each start."""
    sgd_momentum: float = 0.9
    """Momentum of SGD (with train.optimizer = "sgd")."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.noise < 1:
            raise ValueError(f"instdisc.dim and instdisc.noise must be >= 1, got {self.dim}, {self.noise}")
        if self.proximal < 0:
            raise ValueError(f"instdisc.proximal must be >= 0, got {self.proximal}")
        if self.temperature <= 0 or self.z < 0:
            raise ValueError(f"instdisc.temperature must be > 0 and instdisc.z >= 0, got {self.temperature}, {self.z}")
        if self.loss not in ("nce", "softmax"):
            raise ValueError(f"instdisc.loss must be 'nce' or 'softmax', got {self.loss!r}")
        if not 0.0 <= self.bank_momentum < 1.0 or not 0.0 <= self.sgd_momentum < 1.0:
            raise ValueError(f"instdisc.bank_momentum and instdisc.sgd_momentum must be in [0, 1), got "
                             f"{self.bank_momentum}, {self.sgd_momentum}")


@dataclasses.dataclass(kw_only=True)
class InstDiscConfig(TrainConfig):
    """An InstDisc run: the shared sections plus ``backbone`` and ``instdisc``."""

    name: str = "instdisc"
    """Run name (logs)."""
    method: str = "instdisc"
    """The training method (this class: 'instdisc')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet50"))
    """Encoder backbone (ResNet-50 or ResNet-18 in the paper)."""
    instdisc: InstDiscSection = dataclasses.field(default_factory=InstDiscSection)
    """Embedding, memory bank, NCE."""
    data: DataConfig
    """Shards (every sample gets a bank row) and crops (the first global crop is the view)."""


class InstDiscArch(nn.Module):
    """The encoder (backbone + linear head), the memory bank, the NCE normaliser and the step counter."""

    def __init__(self, backbone: BackboneConfig, cfg: InstDiscSection, n_instances: int, seed: int) -> None:
        super().__init__()
        net = backbone.build()
        self.encoder = nn.ModuleDict({"backbone": net, "head": nn.Linear(backbone_dim(net), cfg.dim)})
        self.bank = MemoryBank(n_instances, cfg.dim, momentum=cfg.bank_momentum, seed=seed)
        self.register_buffer("log_z", torch.tensor(math.log(cfg.z) if cfg.z > 0 else float("nan"),
                                                   dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised fp32 embedding of images ``x``."""
        return F.normalize(self.encoder["head"](self.encoder["backbone"](x)).float(), dim=1)


def noise_rows(seed: int, step: int, own: torch.Tensor, m: int, size: int) -> torch.Tensor:
    """(len(own), m) noise rows of a step for the global batch's ``own`` rows, uniform over the bank rows other than
    each sample's own, from a generator seeded by (seed, step): every rank draws the same and slices its share."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = torch.randint(0, size - 1, (len(own), m), generator=g)
    return rows + (rows >= own.cpu()[:, None]).long()  # skip the own row: 0..size-2 -> every row but own


@register_method
class InstDiscMethod(Method):
    """InstDisc (see the module docstring)."""

    name = "instdisc"
    config_class = InstDiscConfig
    cfg: InstDiscConfig
    arch: InstDiscArch

    def build(self) -> InstDiscArch:
        s = self.cfg.instdisc
        self.index = InstanceIndex.build(self.cfg.data.shards.urls, s.index_cache or None)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        return InstDiscArch(self.cfg.backbone, s, len(self.index), self.cfg.seed)

    def parts(self) -> list[Part]:
        return [Part("encoder", self.arch.encoder, "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0),
                     patch_size=getattr(self.arch.encoder["backbone"], "patch_size", 1))

    def param_groups(self) -> list[dict[str, Any]]:
        return plain_param_groups(self.arch.encoder)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.arch.encoder}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.cfg.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=self.cfg.instdisc.sgd_momentum)
        return build_optimizer(groups, self.cfg.optim)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        s, arch = self.cfg.instdisc, self.arch
        crops = batch["global_crops"]
        x = crops[: crops.shape[0] // 2]  # the first global crop of every image
        rows = self.index.rows(batch["sets"], batch["keys"]).to(x.device)
        f = arch.embed(x)
        own = (f.detach() * arch.bank.vectors[rows]).sum(1)
        if s.loss == "nce":
            all_rows = gather_batch(rows)
            noise = noise_rows(self.cfg.seed, int(arch.steps), all_rows, s.noise, len(arch.bank)).to(x.device)
            if torch.isnan(arch.log_z):  # the first step: Z from every rank's features and noise (same on all)
                arch.log_z.fill_(estimate_nce_log_z(gather_batch(f.detach()), arch.bank, noise, s.temperature))
                logger.info("InstDisc NCE normaliser log Z = %.4f (from the first batch)", float(arch.log_z))
            mine = noise[rank() * len(f):(rank() + 1) * len(f)]
            loss = nce_loss(f, rows, arch.bank, mine, s.temperature, log_z=float(arch.log_z))
        else:
            loss = bank_softmax_loss(f, rows, arch.bank, s.temperature)
        parts = {s.loss: loss.detach()}
        if s.proximal > 0:
            prox = (f - arch.bank.vectors[rows]).pow(2).sum(1).mean()
            parts["proximal"] = prox.detach()
            loss = loss + s.proximal * prox
        self._pending = (rows, f.detach())
        return loss, {"losses": {**parts, "total": loss.detach()}, "extras": {"f": f.detach(), "own": own}}

    def after_step(self, values: ScheduleValues) -> None:
        """This step's features of every rank into their bank rows (proximal momentum update)."""
        super().after_step(values)
        if self._pending is not None:
            self.arch.bank.update(*self._pending)
            self._pending = None
        self.arch.steps.add_(1)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Similarity of each feature to its own bank entry, and the feature spread (std x sqrt(dim); 0 collapsed)."""
        f = out["extras"]["f"]
        return {"own_sim": float(out["extras"]["own"].mean()), "feat_std": float(f.std(0).mean() * f.shape[1] ** 0.5)}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (the encoder's backbone, + sidecar)."""
        export_encoders(out, {"backbone.pth": self.arch.encoder}, name=self.cfg.backbone.name, is_main=is_main)

    def summary(self) -> str:
        s = self.cfg.instdisc
        n = sum(p.numel() for p in self.arch.encoder.parameters())
        what = f"NCE with {s.noise} noise entries" if s.loss == "nce" else "full softmax"
        return (f"InstDisc: {self.cfg.backbone.name} + linear {s.dim}-d head ({n / 1e6:.2f}M params), memory bank "
                f"{len(self.arch.bank)} x {s.dim} (momentum {s.bank_momentum}), {what}, T={s.temperature}")
