"""``method = "cmc"``: Contrastive Multiview Coding (Tian, Krishnan, Isola 2019) with the L and ab views of CIE Lab.

- Views: the first global crop of every image (the loader always makes two; the second is unused, so one image is
  one training instance and owns one bank row), converted from the loader's ImageNet-normalised sRGB back to [0, 1]
  and then to CIE Lab (D65) by :func:`rgb_to_lab`. View 1 is L (1 channel), view 2 is ab (2 channels), each scaled
  to [-1, 1] over the sRGB gamut as in the CMC release: ``(L - 50) / 50``, ``(a - 6.025) / 92.208``,
  ``(b + 6.6895) / 101.1675`` (the gamut spans L in [0, 100], a in [-86.183, 98.233], b in [-107.857, 94.478]).
  The paper's ImageNet augmentation is a random resized crop (scale 0.2-1) and a flip, no colour jitter (the
  recipes set it).
- Model: one encoder per view (two backbones of ``backbone.name`` with ``in_chans`` 1 and 2; the paper's ImageNet
  ResNet-50 gives each view a half-width ResNet-50, ``backbone.overrides = {width = 32}``) and a linear
  ``cmc.dim``-d head each; the projections are L2-normalised.
- Loss: ``L(L -> ab) + L(ab -> L)``, each view's anchor against the other view's positive and negatives.
  ``cmc.negatives = "bank"`` (the paper): one memory bank per view (:class:`MemoryBank`, a row per training
  instance from :class:`InstanceIndex`, proximal update with momentum ``cmc.bank_momentum`` = 0.5 after each step);
  z_L is scored against the ab bank's row of its own instance and K rows of the ab bank drawn uniformly (the same
  noise rows serve both directions, as the CMC code), and symmetrically. ``cmc.loss = "nce"``: NCE
  (:func:`nce_log_z`; the normaliser Z of each direction is estimated once, from the first global batch, and kept
  as a log-space buffer); ``"softmax"``: cross entropy over [positive, K noise rows] (the CMC release's later
  "softmax-CE"; the noise may hit the positive row, as there). Similarities are fp32 under autocast.
  ``cmc.negatives = "batch"``: symmetric in-batch InfoNCE of z_L against the z_ab of
  the global batch (gathered across ranks) and back; no bank, no instance index.
- Noise: drawn per global sample row from a generator seeded by (seed, step, row), so any number of processes
  draws the same noise for the same global batch, and a resume (the step counter is a buffer) redraws it.
- Optimizer: SGD with momentum ``cmc.sgd_momentum`` (with ``train.optimizer = "sgd"``), weight decay on every
  parameter. Export: ``backbone.pth`` (the L encoder, 1 input channel) and ``ab_backbone.pth`` (the ab encoder,
  2 input channels); CMC's linear evaluation uses the concatenation of both encoders' features.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropConfig
from pretrain.data.instances import InstanceIndex
from pretrain.losses.contrastive import (
    MemoryBank,
    estimate_nce_log_z,
    info_nce,
    nce_loss,
    sampled_softmax_loss,
)
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.moco import backbone_dim, export_encoders, plain_param_groups
from pretrain.models import build_backbone
from pretrain.optim import ScheduleValues, build_optimizer
from pretrain.ssl.meta_arch import BackboneConfig
from pretrain.utils.dist import gather_batch, rank

__all__ = ["CMCArch", "CMCConfig", "CMCMethod", "CMCSection", "lab_views", "noise_rows", "rgb_to_lab"]

logger = logging.getLogger("pretrain")

# linear sRGB -> XYZ (from the sRGB primaries and the D65 white, IEC 61966-2-1) and the D65 white (2 deg observer)
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375), (0.2126729, 0.7151522, 0.0721750), (0.0193339, 0.1191920, 0.9503041))
_WHITE_D65 = (0.95047, 1.0, 1.08883)
# centre / half-range of L, a, b over the sRGB gamut (the CMC release's normalisation)
_LAB_CENTER = (50.0, (98.233 - 86.183) / 2, (94.478 - 107.857) / 2)
_LAB_SCALE = (50.0, (98.233 + 86.183) / 2, (94.478 + 107.857) / 2)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65) of sRGB images ``rgb`` (N, 3, H, W) in [0, 1]: L in [0, 100], a and b roughly in [-110, 110]."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must be (N, 3, H, W), got {tuple(rgb.shape)}")
    c = rgb.float().clamp(0.0, 1.0)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = torch.tensor(_RGB_TO_XYZ, dtype=c.dtype, device=c.device)
    white = torch.tensor(_WHITE_D65, dtype=c.dtype, device=c.device).view(1, 3, 1, 1)
    xyz = (m.view(1, 3, 3, 1, 1) * linear[:, None]).sum(2) / white  # elementwise: fp32 under autocast too
    eps = (6.0 / 29.0) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1.0 / 3.0), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_views(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, ab)`` views (N, 1, H, W) and (N, 2, H, W), scaled to [-1, 1], of ImageNet-normalised RGB ``crops``."""
    x = crops.float()  # every op below is elementwise, so autocast leaves it in fp32
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    lab = rgb_to_lab(x * std + mean)
    center = torch.tensor(_LAB_CENTER, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    scale = torch.tensor(_LAB_SCALE, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    lab = (lab - center) / scale
    return lab[:, :1], lab[:, 1:]


def noise_rows(seed: int, step: int, rows: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """(len(rows), k) bank indices drawn uniformly from ``0 .. n-1``, row ``r`` of the global batch by its own
    generator seeded with (seed, step, r): the same whichever rank holds the row."""
    out = torch.empty(len(rows), k, dtype=torch.long)
    for i, r in enumerate(rows.tolist()):
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + r)
        out[i] = torch.randint(n, (k,), generator=g)
    return out


@dataclasses.dataclass(kw_only=True)
class CMCSection:
    """CMC settings (defaults: the paper's ImageNet values)."""

    dim: int = 128
    """Projection (and bank) dimension."""
    negatives: str = "bank"
    """'bank': K noise rows of the other view's memory bank (the paper); 'batch': the other view's global batch."""
    loss: str = "nce"
    """With the bank: 'nce' (the paper) or 'softmax' (cross entropy over the positive and the K noise rows)."""
    num_negatives: int = 16384
    """K: noise rows per anchor (bank only)."""
    temperature: float = 0.07
    """T of the exponentiated similarities."""
    bank_momentum: float = 0.5
    """Proximal update of a bank row: ``v <- normalize(m v + (1 - m) f)``."""
    index_cache: str = ""
    """Text file of the instance index (scanned from the shards' tar headers once, then reused); '' scans each run."""
    sgd_momentum: float = 0.9
    """Momentum of SGD (with train.optimizer = "sgd")."""

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"cmc.dim must be >= 1, got {self.dim}")
        if self.negatives not in ("bank", "batch"):
            raise ValueError(f"cmc.negatives must be 'bank' or 'batch', got {self.negatives!r}")
        if self.loss not in ("nce", "softmax"):
            raise ValueError(f"cmc.loss must be 'nce' or 'softmax', got {self.loss!r}")
        if self.num_negatives < 1:
            raise ValueError(f"cmc.num_negatives must be >= 1, got {self.num_negatives}")
        if not self.temperature > 0:
            raise ValueError(f"cmc.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.bank_momentum < 1.0:
            raise ValueError(f"cmc.bank_momentum must be in [0, 1), got {self.bank_momentum}")
        if not 0.0 <= self.sgd_momentum < 1.0:
            raise ValueError(f"cmc.sgd_momentum must be in [0, 1), got {self.sgd_momentum}")


@dataclasses.dataclass(kw_only=True)
class CMCConfig(TrainConfig):
    """A CMC run: the shared sections plus ``backbone`` (built once per view) and ``cmc``."""

    name: str = "cmc"
    """Run name (logs)."""
    method: str = "cmc"
    """The training method (this class: 'cmc')."""
    backbone: BackboneConfig = dataclasses.field(
        default_factory=lambda: BackboneConfig(name="resnet50", overrides={"width": 32}))
    """The encoder of each view (``in_chans`` is set per view); the paper: two half-width ResNet-50s."""
    cmc: CMCSection = dataclasses.field(default_factory=CMCSection)
    """Head, negatives, loss, bank."""
    data: DataConfig
    """Shards and crops (the first global crop is used)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if "in_chans" in self.backbone.overrides:
            raise ValueError("backbone.overrides.in_chans: CMC sets it per view (1 for L, 2 for ab); remove it")
        if self.backbone.weights:
            raise ValueError("backbone.weights: CMC's encoders take 1 and 2 input channels; start from scratch")
        if self.phases:
            raise ValueError("phases: CMC has a single phase; remove the [[phases]] entries")


class CMCArch(nn.Module):
    """The L and ab encoders; with a bank, one memory bank per view, the NCE normalisers and the step counter."""

    def __init__(self, backbone: BackboneConfig, cfg: CMCSection, bank_size: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.l = self._encoder(backbone, 1, cfg.dim)
        self.ab = self._encoder(backbone, 2, cfg.dim)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.bank_l: MemoryBank | None = None
        self.bank_ab: MemoryBank | None = None
        if bank_size:
            self.bank_l = MemoryBank(bank_size, cfg.dim, cfg.bank_momentum, seed=2 * seed)
            self.bank_ab = MemoryBank(bank_size, cfg.dim, cfg.bank_momentum, seed=2 * seed + 1)
            self.register_buffer("log_z_l", torch.zeros((), dtype=torch.float64))  # NCE normalisers (log Z)
            self.register_buffer("log_z_ab", torch.zeros((), dtype=torch.float64))
            self.register_buffer("z_ready", torch.zeros((), dtype=torch.uint8))  # 1 once estimated
            self.register_buffer("seen", torch.zeros(bank_size, dtype=torch.uint8))

    @staticmethod
    def _encoder(backbone: BackboneConfig, in_chans: int, dim: int) -> nn.ModuleDict:
        net = build_backbone(backbone.name, drop_path_rate=backbone.drop_path_rate,
                             **{**backbone.overrides, "in_chans": in_chans})
        return nn.ModuleDict({"backbone": net, "head": nn.Linear(backbone_dim(net), dim)})

    @staticmethod
    def embed(encoder: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        """The normalised fp32 projection of view ``x`` by ``encoder``."""
        return F.normalize(encoder["head"](encoder["backbone"](x)).float(), dim=1)


@register_method
class CMCMethod(Method):
    """CMC with the L and ab views (see the module docstring)."""

    name = "cmc"
    config_class = CMCConfig
    cfg: CMCConfig
    arch: CMCArch

    def build(self) -> CMCArch:
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.index: InstanceIndex | None = None
        c = self.cfg.cmc
        if c.negatives == "bank":
            self.index = InstanceIndex.build(self.cfg.data.shards.urls, c.index_cache or None)
        return CMCArch(self.cfg.backbone, c, len(self.index) if self.index else 0, seed=self.cfg.seed)

    def parts(self) -> list[Part]:
        return [Part("l", self.arch.l, "trained"), Part("ab", self.arch.ab, "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0),
                     patch_size=getattr(self.arch.l["backbone"], "patch_size", 1))

    def param_groups(self) -> list[dict[str, Any]]:
        return plain_param_groups(self.arch.l, self.arch.ab)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"l": self.arch.l, "ab": self.arch.ab}

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.cfg.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.0, momentum=self.cfg.cmc.sgd_momentum)
        return build_optimizer(groups, self.cfg.optim)

    def noise(self, n_local: int, device: torch.device) -> torch.Tensor:
        """This rank's (n_local, K) noise rows of the step: rows ``rank * n_local ..`` of the global batch's."""
        rows = torch.arange(n_local) + rank() * n_local
        return noise_rows(self.cfg.seed, int(self.arch.steps), rows, self.cfg.cmc.num_negatives,
                          len(self.arch.bank_l)).to(device)

    @torch.no_grad()
    def _estimate_z(self, z_l: torch.Tensor, z_ab: torch.Tensor, device: torch.device) -> None:
        """Z of both directions from the first global batch (every rank gets the same values)."""
        g_l, g_ab = gather_batch(z_l.detach()), gather_batch(z_ab.detach())
        noise = noise_rows(self.cfg.seed, int(self.arch.steps), torch.arange(len(g_l)), self.cfg.cmc.num_negatives,
                           len(self.arch.bank_l)).to(device)
        t = self.cfg.cmc.temperature
        self.arch.log_z_l.fill_(estimate_nce_log_z(g_l, self.arch.bank_ab, noise, t))
        self.arch.log_z_ab.fill_(estimate_nce_log_z(g_ab, self.arch.bank_l, noise, t))
        self.arch.z_ready.fill_(1)
        logger.info("CMC NCE normalisers: log Z_l=%.4f, log Z_ab=%.4f", float(self.arch.log_z_l),
                    float(self.arch.log_z_ab))

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        crops = batch["global_crops"]
        first = crops[: crops.shape[0] // 2]  # crop-major: every image's first global crop
        view_l, view_ab = lab_views(first)
        z_l, z_ab = self.arch.embed(self.arch.l, view_l), self.arch.embed(self.arch.ab, view_ab)
        c, extras = self.cfg.cmc, {"z_l": z_l.detach(), "z_ab": z_ab.detach()}
        if c.negatives == "batch":
            l_to_ab = info_nce(z_l, z_ab, temperature=c.temperature, normalize=False)
            ab_to_l = info_nce(z_ab, z_l, temperature=c.temperature, normalize=False)
        else:
            assert self.index is not None and self.arch.bank_l is not None and self.arch.bank_ab is not None
            idx = self.index.rows(batch["sets"], batch["keys"]).to(z_l.device)
            noise = self.noise(len(z_l), z_l.device)
            if c.loss == "nce":
                if not int(self.arch.z_ready):
                    self._estimate_z(z_l, z_ab, z_l.device)
                l_to_ab = nce_loss(z_l, idx, self.arch.bank_ab, noise, c.temperature, log_z=float(self.arch.log_z_l))
                ab_to_l = nce_loss(z_ab, idx, self.arch.bank_l, noise, c.temperature, log_z=float(self.arch.log_z_ab))
            else:
                l_to_ab = sampled_softmax_loss(z_l, idx, self.arch.bank_ab, noise, c.temperature)
                ab_to_l = sampled_softmax_loss(z_ab, idx, self.arch.bank_l, noise, c.temperature)
            extras["bank_pos"] = (z_l.detach() * self.arch.bank_ab.vectors[idx]).sum(1)
            self._pending = (idx, z_l.detach(), z_ab.detach())
        loss = l_to_ab + ab_to_l
        return loss, {"losses": {"l_to_ab": l_to_ab.detach(), "ab_to_l": ab_to_l.detach(), "total": loss.detach()},
                      "extras": extras}

    def after_step(self, values: ScheduleValues) -> None:
        """Both banks move towards this step's features of every rank (gathered), then the step counter."""
        super().after_step(values)
        if self._pending is not None:
            idx, z_l, z_ab = self._pending
            self.arch.bank_l.update(idx, z_l)
            self.arch.bank_ab.update(idx, z_ab)
            self.arch.seen[gather_batch(idx)] = 1
            self._pending = None
        self.arch.steps.add_(1)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Mean cosine of the two views of an image, per-dimension std of z_L (x sqrt(dim): ~1 healthy, 0
        collapsed) and, with banks, the cosine of z_L to its instance's ab bank row and the fraction of rows seen."""
        e = out["extras"]
        z_l, z_ab = e["z_l"], e["z_ab"]
        res = {"pos_sim": float((z_l * z_ab).sum(1).mean()), "z_std": float(z_l.std(0).mean() * z_l.shape[1] ** 0.5)}
        if "bank_pos" in e:
            res.update(bank_pos_sim=float(e["bank_pos"].mean()), bank_seen=float(self.arch.seen.float().mean()))
        return res

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (L encoder, 1 input channel) and ``ab_backbone.pth`` (ab encoder, 2 input channels)."""
        export_encoders(out, {"backbone.pth": self.arch.l, "ab_backbone.pth": self.arch.ab},
                        name=self.cfg.backbone.name, is_main=is_main)

    def summary(self) -> str:
        c = self.cfg.cmc
        n = sum(p.numel() for p in self.arch.parameters()) / 1e6
        neg = (f"{c.loss} over {c.num_negatives} bank rows of {len(self.arch.bank_l)}" if self.arch.bank_l is not None
               else "in-batch InfoNCE")
        return f"CMC L|ab: 2 x {self.cfg.backbone.name} + linear {c.dim}-d heads ({n:.2f}M params), {neg}, " \
               f"T={c.temperature}"
