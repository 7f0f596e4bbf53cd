"""``method = "cpc"``: Contrastive Predictive Coding on images, v2 style (Hénaff et al. 2019, "Data-Efficient Image
Recognition with Contrastive Predictive Coding"; v1: van den Oord et al. 2018, "Representation Learning with
Contrastive Predictive Coding").

- Views: the first global crop of every image (the loader's second crop is not used: two crops of one image would
  be near-duplicate negatives of each other), no local crops. The crop (``cpc.crop_size`` =
  ``patch_size + (grid - 1) * stride`` px, checked against ``data.crops.global_size``) is cut with
  ``Tensor.unfold`` into a ``grid x grid`` grid of overlapping ``patch_size`` patches (v1/v2 on ImageNet: 7 x 7
  patches of 64 px, stride 32, from a 256 px crop).
- Patch augmentation (v2), per patch on tensors: colour dropping (keep one of the three channels, the other two
  set to 0, i.e. the normalised mean), horizontal flip, and v1's spatial jitter (a random ``patch_size - jitter``
  sub-crop moved to the centre, zero padding). Every random number comes from a generator seeded by (``seed``,
  the step counter buffer, the global sample index), so the draws do not depend on how the batch is split over
  ranks and a resume restores them.
- Encoder: a ResNet applied to each patch independently, its pooled feature ``z_ij`` (``backbone_dim``-d). With
  ``cpc.norm = "layernorm"`` (default, as v2) every BatchNorm of the ResNet is a GroupNorm(1, C): per-patch
  statistics, so patches cannot exchange information through batch statistics (v2's reason for dropping BN).
- Context network: a PixelCNN-style stack over the feature grid: a 1x1 projection then residual blocks of masked
  convolutions (a k x k kernel whose rows below the centre are masked out, implemented as a (k//2 + 1) x k kernel
  padded only above), so ``c_ij`` sees only rows <= i. ``cpc.directions``: 1 = top-down; 2 adds bottom-up (v2
  predicts from both directions); 4 adds left-right and right-left. Each direction has its own context network
  and predictors and runs on the correspondingly flipped / transposed grid.
- Predictions: for k in ``first_step .. first_step + steps - 1`` a separate linear map ``W_k`` (no bias)
  predicts ``z_{i+k, j}`` from ``c_ij`` (rows of the oriented grid; positions whose target is off the grid are
  not predicted).
- Loss: InfoNCE of every prediction against every patch feature of the global batch (all images, all positions,
  gathered across ranks with gradients; the true ``z_{i+k,j}`` is the positive), scores are plain dot products
  (``temperature = 1``, as CPC), in fp32 with logsumexp. Per (direction, k) the mean over this rank's
  predictions, then the mean over k and directions: with equal per-rank batches the mean over ranks is exactly
  the single-process loss on the concatenated batch, and so are the data-parallel averaged gradients.
- Optimizer: Adam as the papers (``train.optimizer = "adamw"`` with the recipe's betas / eps / weight decay).
- Export: ``backbone.pth`` (the patch encoder, torchvision layout + sidecar with ``norm``). CPC v2's linear
  evaluation mean-pools the patch features of the grid (:func:`patch_grid_features`); dinoforge's k-NN / linear
  evaluation runs the encoder on the whole image (``model(images)``, the same pooled feature as
  ``forward_features``'s ``x_norm_clstoken``: the global average of the last feature map).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import full_state_dict
from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.methods.dinov2 import export_backbone_with_config
from pretrain.methods.moco import backbone_dim, plain_param_groups
from pretrain.models import build_backbone, is_resnet
from pretrain.optim import ScheduleValues
from pretrain.utils.dist import all_gather_with_grad, rank

__all__ = ["CPCArch", "CPCConfig", "CPCHead", "CPCMethod", "CPCSection", "CausalContext", "augment_patches",
           "cpc_loss", "cut_patches", "draw_patch_ops", "orient", "patch_grid_features"]

logger = logging.getLogger("pretrain")

DIRECTIONS = ("top-down", "bottom-up", "left-right", "right-left")


@dataclasses.dataclass(kw_only=True)
class CPCSection:
    """CPC settings (defaults: the v1/v2 ImageNet grid, v2's layer norm, patch augmentation and two directions)."""

    backbone: str = "resnet101"
    """The patch encoder, a ResNet name of ``pretrain.models`` (``resnet101``, ``resnet18_small``, ...)."""
    backbone_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """``ResNetConfig`` overrides (``width``, ...); ``norm`` comes from ``cpc.norm``."""
    norm: str = "layernorm"
    """'layernorm' (v2: per-patch GroupNorm(1, C) in every norm of the encoder) or 'bn' (v1: batch norm)."""
    grid: int = 7
    """Patches per side."""
    patch_size: int = 64
    """Patch side in pixels."""
    stride: int = 32
    """Distance between neighbouring patches in pixels (< patch_size: overlapping patches)."""
    steps: int = 5
    """K: prediction lengths per direction."""
    first_step: int = 1
    """The shortest prediction length (rows ahead); lengths are first_step .. first_step + steps - 1."""
    directions: int = 2
    """1: top-down; 2: + bottom-up; 4: + left-right and right-left."""
    context_dim: int = 0
    """Width of the context network; 0 = the encoder's feature width."""
    context_blocks: int = 5
    """Residual blocks of masked convolutions."""
    kernel_size: int = 3
    """Width k of the masked k x k convolutions (odd)."""
    temperature: float = 1.0
    """Divides the dot-product scores (CPC: 1, none)."""
    color_drop_p: float = 1.0
    """Probability per patch of dropping two of the three colour channels (v2)."""
    flip_p: float = 0.5
    """Probability per patch of a horizontal flip (v2)."""
    jitter: int = 0
    """Spatial jitter in pixels: a random (patch_size - jitter)^2 sub-crop, re-centred and zero padded (v1: 4)."""

    def __post_init__(self) -> None:
        if not is_resnet(self.backbone):
            raise ValueError(f"cpc.backbone must be a ResNet name (resnet101, resnet18_small, ...), got "
                             f"{self.backbone!r}")
        if "norm" in self.backbone_overrides:
            raise ValueError("cpc.backbone_overrides must not set norm: use cpc.norm")
        if self.norm not in ("layernorm", "bn"):
            raise ValueError(f"cpc.norm must be 'layernorm' or 'bn', got {self.norm!r}")
        for name in ("grid", "patch_size", "stride", "steps", "first_step", "context_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"cpc.{name} must be >= 1, got {getattr(self, name)}")
        if self.grid < 2:
            raise ValueError(f"cpc.grid must be >= 2, got {self.grid}")
        if self.first_step + self.steps - 1 > self.grid - 1:
            raise ValueError(f"cpc.steps: lengths {self.first_step}..{self.first_step + self.steps - 1} reach past "
                             f"a grid of {self.grid} rows (at most {self.grid - 1})")
        if self.directions not in (1, 2, 4):
            raise ValueError(f"cpc.directions must be 1, 2 or 4, got {self.directions}")
        if self.context_dim < 0:
            raise ValueError(f"cpc.context_dim must be >= 0, got {self.context_dim}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"cpc.kernel_size must be odd and >= 1, got {self.kernel_size}")
        if not self.temperature > 0:
            raise ValueError(f"cpc.temperature must be > 0, got {self.temperature}")
        for name in ("color_drop_p", "flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"cpc.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.jitter < self.patch_size:
            raise ValueError(f"cpc.jitter must be in [0, patch_size), got {self.jitter}")

    @property
    def crop_size(self) -> int:
        """Side of the crop the grid covers: ``patch_size + (grid - 1) * stride``."""
        return self.patch_size + (self.grid - 1) * self.stride

    @property
    def offsets(self) -> list[int]:
        """The prediction lengths k."""
        return list(range(self.first_step, self.first_step + self.steps))


@dataclasses.dataclass(kw_only=True)
class CPCConfig(TrainConfig):
    """A CPC run: the shared sections plus ``cpc``."""

    name: str = "cpc"
    """Run name (logs)."""
    method: str = "cpc"
    """The training method (this class: 'cpc')."""
    cpc: CPCSection = dataclasses.field(default_factory=CPCSection)
    """Encoder, patch grid, context network, prediction lengths and directions, patch augmentation."""
    data: DataConfig
    """Shards and crops (the first global crop is cut into the patch grid)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phases:
            raise ValueError("phases: CPC has a single phase; remove the [[phases]] entries")
        size = self.data.crops.global_size
        if size != self.cpc.crop_size:
            raise ValueError(f"cpc.grid, cpc.patch_size and cpc.stride cover {self.cpc.crop_size} px crops but "
                             f"data.crops.global_size is {size}")


# ---------------------------------------------------------------------------------------------- patches
def cut_patches(images: torch.Tensor, grid: int, patch_size: int, stride: int) -> torch.Tensor:
    """The ``(B, grid * grid, C, P, P)`` overlapping patches of ``(B, C, S, S)`` images, row-major."""
    b, c, h, w = images.shape
    size = patch_size + (grid - 1) * stride
    if h != size or w != size:
        raise ValueError(f"a {grid}x{grid} grid of {patch_size} px patches at stride {stride} needs {size} px "
                         f"images, got {h}x{w}")
    p = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # (B, C, G, G, P, P)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(b, grid * grid, c, patch_size, patch_size)


def _sample_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (2**63 - 1)


def draw_patch_ops(seed: int, step: int, indices: Sequence[int], n: int, channels: int,
                   jitter: int) -> dict[str, torch.Tensor]:
    """The random draws of the patch augmentation of ``n`` patches of each sample in ``indices`` (global sample
    indices): one generator per sample seeded by (seed, step, index), so they do not depend on the batch split."""
    keep, drop, flip, shift = [], [], [], []
    for index in indices:
        g = torch.Generator().manual_seed(_sample_seed(seed, step, int(index)))
        keep.append(torch.randint(channels, (n,), generator=g))
        drop.append(torch.rand(n, generator=g))
        flip.append(torch.rand(n, generator=g))
        shift.append(torch.randint(jitter + 1, (n, 2), generator=g))
    return {"keep": torch.stack(keep), "drop_u": torch.stack(drop), "flip_u": torch.stack(flip),
            "shift": torch.stack(shift)}


def augment_patches(patches: torch.Tensor, ops: dict[str, torch.Tensor], *, color_drop_p: float, flip_p: float,
                    jitter: int) -> torch.Tensor:
    """CPC's per-patch augmentation of ``(B, n, C, P, P)`` patches with the draws ``ops`` of
    :func:`draw_patch_ops`: spatial jitter, horizontal flip, colour dropping (in this order)."""
    b, n, c, p, _ = patches.shape
    x = patches.reshape(b * n, c, p, p)
    dev = x.device
    if jitter > 0:  # the sub-crop at offset (oy, ox) lands at (jitter // 2, jitter // 2)
        off = ops["shift"].reshape(b * n, 2).to(dev)
        pos = torch.arange(p, device=dev)
        half, keep = jitter // 2, p - jitter
        src_y = (pos[None] - half + off[:, :1]).clamp(0, p - 1)
        src_x = (pos[None] - half + off[:, 1:]).clamp(0, p - 1)
        inside = ((pos >= half) & (pos < half + keep)).to(x.dtype)
        rows = torch.arange(b * n, device=dev)[:, None, None]
        x = x[rows, :, src_y[:, :, None], src_x[:, None, :]].permute(0, 3, 1, 2)  # (N, P, P, C) -> (N, C, P, P)
        x = x * (inside[:, None] * inside[None, :])
    flip = (ops["flip_u"].reshape(-1) < flip_p).to(dev)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    drop = (ops["drop_u"].reshape(-1) < color_drop_p).to(dev)
    kept = F.one_hot(ops["keep"].reshape(-1).to(dev), c).to(x.dtype)
    mask = torch.where(drop[:, None], kept, torch.ones_like(kept))
    return (x * mask[:, :, None, None]).reshape(b, n, c, p, p)


# ---------------------------------------------------------------------------------------------- networks
def orient(t: torch.Tensor, direction: int) -> torch.Tensor:
    """The grid (last two dims) seen so that ``direction`` (index into ``DIRECTIONS``) runs top-down."""
    if direction == 0:
        return t
    if direction == 1:
        return t.flip(-2)
    t = t.transpose(-2, -1)
    return t if direction == 2 else t.flip(-2)


class _MaskedConv(nn.Conv2d):
    """A k x k convolution whose kernel rows below the centre are masked out: a (k//2 + 1) x k kernel padded
    k//2 rows above (and k//2 columns each side), so output row i sees input rows i - k//2 .. i."""

    def __init__(self, channels: int, k: int) -> None:
        super().__init__(channels, channels, (k // 2 + 1, k))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.k // 2
        return super().forward(F.pad(x, (h, h, h, 0)))


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.conv = _MaskedConv(channels, k)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.relu(self.conv(F.relu(x))))


class CausalContext(nn.Module):
    """PixelCNN-style context network: 1x1 projection, residual blocks of masked convolutions; ``c[:, :, i]``
    depends only on rows ``<= i`` of the input grid."""

    def __init__(self, in_dim: int, dim: int, blocks: int, k: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1)
        self.blocks = nn.Sequential(*[_ResidualBlock(dim, k) for _ in range(blocks)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Context vectors ``(B, dim, G, G)`` of a feature grid ``(B, in_dim, G, G)``."""
        return self.blocks(self.proj(z))


class CPCHead(nn.Module):
    """Per direction a context network and the linear predictions ``W_k c`` for every length k."""

    def __init__(self, dim: int, cfg: CPCSection) -> None:
        super().__init__()
        width = cfg.context_dim or dim
        self.offsets = cfg.offsets
        self.contexts = nn.ModuleList([CausalContext(dim, width, cfg.context_blocks, cfg.kernel_size)
                                       for _ in range(cfg.directions)])
        self.predictors = nn.ModuleList([nn.ModuleList([nn.Linear(width, dim, bias=False) for _ in self.offsets])
                                         for _ in range(cfg.directions)])

    def context(self, z: torch.Tensor, direction: int) -> torch.Tensor:
        """Context ``(B, width, G, G)`` of the oriented grid ``orient(z, direction)``."""
        return self.contexts[direction](orient(z, direction))

    def forward(self, z: torch.Tensor) -> list[list[torch.Tensor]]:
        """Predictions ``[direction][k] -> (B, G - k, G, dim)``: from context row i of the oriented grid, the
        feature of row i + k."""
        out = []
        for d, predictors in enumerate(self.predictors):
            c = self.context(z, d).permute(0, 2, 3, 1)  # (B, G, G, width)
            out.append([w(c[:, : c.shape[1] - k]) for k, w in zip(self.offsets, predictors)])
        return out


class CPCArch(nn.Module):
    """The patch encoder (``backbone``), the context networks and predictors (``head``) and the step counter that
    keys the patch augmentation."""

    steps: torch.Tensor

    def __init__(self, cfg: CPCSection) -> None:
        super().__init__()
        self.backbone = build_backbone(cfg.backbone, **{**cfg.backbone_overrides, "norm": cfg.norm})
        self.head = CPCHead(backbone_dim(self.backbone), cfg)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def cpc_loss(z: torch.Tensor, preds: list[list[torch.Tensor]], offsets: Sequence[int],
             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, top-1 accuracy)`` of the predictions ``preds`` (:meth:`CPCHead.forward`) of this rank's feature
    grid ``z`` (B, D, G, G).

    Candidates: every patch feature of the global batch (gathered with gradients, sample-major then row-major);
    the positive of the prediction from oriented position (i, j) at length k is the feature at oriented
    (i + k, j) of the same image. Mean over this rank's predictions per (direction, k), then over k and
    directions (fp32 scores, cross entropy via logsumexp).
    """
    b, dim, g, _ = z.shape
    cand = all_gather_with_grad(z.permute(0, 2, 3, 1).reshape(b * g * g, dim)).float()
    first = (rank() * b + torch.arange(b, device=z.device))[:, None, None] * (g * g)
    flat = torch.arange(g * g, device=z.device).view(g, g)
    losses, hits = [], []
    for d, per_k in enumerate(preds):
        where = orient(flat, d)  # oriented position -> flat index in the original grid
        for k, p in zip(offsets, per_k):
            target = (first + where[k:][None]).reshape(-1)
            with torch.autocast(z.device.type, enabled=False):  # fp32 scores even under a bf16 autocast
                logits = p.reshape(-1, dim).float() @ cand.T / temperature
            losses.append(F.cross_entropy(logits, target))
            hits.append((logits.detach().argmax(1) == target).float().mean())
    return torch.stack(losses).mean(), torch.stack(hits).mean()


def patch_grid_features(backbone: nn.Module, images: torch.Tensor, grid: int, patch_size: int,
                        stride: int) -> torch.Tensor:
    """CPC v2's evaluation features: the mean of the encoder's features of the ``grid x grid`` patches."""
    patches = cut_patches(images, grid, patch_size, stride)
    b, n = patches.shape[:2]
    return backbone(patches.flatten(0, 1)).view(b, n, -1).mean(1)


@register_method
class CPCMethod(Method):
    """CPC v2 (see the module docstring)."""

    name = "cpc"
    config_class = CPCConfig
    cfg: CPCConfig
    arch: CPCArch

    def build(self) -> CPCArch:
        return CPCArch(self.cfg.cpc)

    def parts(self) -> list[Part]:
        return [Part("model", self.arch, "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0), patch_size=1)

    def param_groups(self) -> list[dict[str, Any]]:
        return plain_param_groups(self.arch)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.arch.backbone, "head": self.arch.head}

    def encode(self, images: torch.Tensor, step: int) -> torch.Tensor:
        """The feature grid ``(B, D, G, G)`` of this rank's images, patch-augmented for ``step``."""
        s = self.cfg.cpc
        patches = cut_patches(images, s.grid, s.patch_size, s.stride)
        b, n, c = patches.shape[:3]
        first = rank() * b
        ops = draw_patch_ops(self.cfg.seed, step, range(first, first + b), n, c, s.jitter)
        patches = augment_patches(patches, ops, color_drop_p=s.color_drop_p, flip_p=s.flip_p, jitter=s.jitter)
        z = self.arch.backbone(patches.flatten(0, 1))
        return z.view(b, s.grid, s.grid, -1).permute(0, 3, 1, 2)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        crops = batch["global_crops"]  # crop-major: every image's first crop, then every second crop
        images = crops[: len(crops) // 2]
        z = self.encode(images, int(self.arch.steps))
        preds = self.arch.head(z)
        loss, acc = cpc_loss(z, preds, self.cfg.cpc.offsets, self.cfg.cpc.temperature)
        return loss, {"losses": {"infonce": loss.detach(), "total": loss.detach()}, "extras": {"acc": acc}}

    def after_step(self, values: ScheduleValues) -> None:
        """Advance the step counter that keys the patch augmentation."""
        super().after_step(values)
        self.arch.steps.add_(1)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Top-1 accuracy of the positive among all candidates (this rank's predictions)."""
        return {"cpc_acc": float(out["extras"]["acc"])}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (+ ``.json``): the patch encoder."""
        sd = full_state_dict(self.arch)
        if not is_main:
            return
        s = self.cfg.cpc
        out.mkdir(parents=True, exist_ok=True)
        export_backbone_with_config(sd, out / "backbone.pth", name=s.backbone, backbone=self.arch.backbone,
                                    extra={"method": "cpc", "grid": s.grid, "patch_size": s.patch_size,
                                           "stride": s.stride})
        logger.info("exported the CPC patch encoder to %s", out)

    def summary(self) -> str:
        s = self.cfg.cpc
        n = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in self.arch.named_children()}
        return (f"CPC: {s.backbone} ({s.norm}) {n['backbone']:.2f}M + context/predictors {n['head']:.2f}M, "
                f"{s.grid}x{s.grid} patches of {s.patch_size} px (stride {s.stride}), k={s.offsets}, "
                f"{', '.join(DIRECTIONS[: s.directions])}")
