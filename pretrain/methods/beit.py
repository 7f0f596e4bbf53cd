"""``method = "beit"``: BEiT v1 (Bao, Dong, Piao & Wei 2022, "BEiT: BERT Pre-Training of Image Transformers"),
masked image modelling against the codes of a frozen discrete tokenizer.

- View: one crop per image (the first of the loader's two global crops): random resized crop and flip (the
  recipe adds BEiT's colour jitter). The same crop is both the ViT's input and the tokenizer's: BEiT feeds the
  DALL-E tokenizer the same crop at 112 px (8 px per code) beside the ViT's 224 px (16 px per patch); here the
  tokenizer sees the crop at ``beit.tokenizer_size`` px (0: the crop's own size; else a bilinear, antialiased
  resize), ImageNet-normalised like the ViT input, and its code grid must equal the ViT's patch grid.
- Masking: per image a block mask (:func:`pretrain.data.masking.block_mask`, BEiT's ``MaskingGenerator``) of
  ``beit.num_mask_patches`` patches (75 of 196, ~40%), rectangles of at least ``beit.min_block_patches`` (16) and
  aspect in [0.3, 1 / 0.3], drawn from a generator seeded by (``seed``, the step counter buffer, the global sample
  index), so the masks do not depend on the split over ranks and a resume restores them.
- Encoder: the ViT on all tokens, the masked patch embeddings replaced by a learned [MASK] token (the backbone's
  ``mask_token``, re-initialised N(0, 0.02)) before the position embeddings are added; then its final norm.
- Head and loss: a linear layer (N(0, 0.02), zero bias) from each masked patch's output to the tokenizer's K codes;
  cross-entropy on the masked patches only, averaged over the masked patches of the global batch (the count is
  summed over ranks, so 2 processes equal 1).
- Tokenizer: a ``method = "vqtok"`` export (:func:`pretrain.methods.vqtok.load_tokenizer`), a 'frozen' part.
  Differences from the paper's: a small VQ-VAE with an EMA codebook trained on the same shards, not the DALL-E
  dVAE (Gumbel-softmax relaxation, trained on 250M images); its codes are nearest-neighbour assignments.
- Left out: the shared relative position bias (learned absolute position embeddings instead) and BEiT's
  init rescaling of the blocks' output projections; LayerScale follows ``backbone.overrides.init_values``
  (the full recipe sets BEiT's 0.1).
- Optimizer (recipe): AdamW (0.9, 0.999), lr 1.5e-3 at batch 2048, wd 0.05, cosine with 10 warm-up epochs,
  gradient clipping 3.0; no weight decay on biases, norms, LayerScale, position embeddings and tokens.
- Metrics: ``mim`` (the loss) every step; masked-token accuracy, the accuracy of always predicting the most frequent
  masked target of the batch, the masked fraction and the perplexity of the targets as monitors.
- Checkpoint: the whole ``arch``, the frozen tokenizer included (it is small; the export must still exist to build
  the run).
- Export: ``backbone.pth`` (+ ``.json`` sidecar; a plain ViT) and ``head.pth`` (the code head's state dict).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import full_state_dict
from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.data.masking import block_mask
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method, vit_decay_groups
from pretrain.methods.dinov2 import export_backbone_with_config
from pretrain.methods.vqtok import code_perplexity, load_tokenizer
from pretrain.models import ViTConfig
from pretrain.optim import ScheduleValues
from pretrain.ssl.meta_arch import BackboneConfig
from pretrain.utils.dist import all_reduce_sum_, rank, world_size

__all__ = ["BEiTArch", "BEiTConfig", "BEiTMethod", "BEiTSection", "beit_masks"]

logger = logging.getLogger("pretrain")



@dataclasses.dataclass(kw_only=True)
class BEiTSection:
    """BEiT settings (defaults: the paper's ViT-B/16 at 224 px, 14 x 14 patches)."""

    tokenizer: str
    """A vqtok run's export folder (or its ``tokenizer.pth``): the frozen tokenizer whose codes are the targets."""
    tokenizer_size: int = 0
    """Side in px of the crop as the tokenizer sees it; 0: the crop's size."""
    num_mask_patches: int = 75
    """Patches masked per image (75 of 196: ~40%)."""
    min_block_patches: int = 16
    """Smallest masked rectangle, in patches."""
    max_block_patches: int = 0
    """Largest new patches per rectangle; 0: no limit but the budget (BEiT's None)."""
    min_aspect: float = 0.3
    """Smallest rectangle aspect ratio (the largest is its inverse)."""

    def __post_init__(self) -> None:
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError("beit.tokenizer must name a vqtok export (folder or tokenizer.pth), got "
                             f"{self.tokenizer!r}")
        if self.tokenizer_size < 0:
            raise ValueError(f"beit.tokenizer_size must be >= 0, got {self.tokenizer_size}")
        if self.num_mask_patches < 1:
            raise ValueError(f"beit.num_mask_patches must be >= 1, got {self.num_mask_patches}")
        if not 1 <= self.min_block_patches <= self.num_mask_patches:
            raise ValueError(f"beit.min_block_patches must be in [1, num_mask_patches = {self.num_mask_patches}], "
                             f"got {self.min_block_patches}")
        if self.max_block_patches < 0:
            raise ValueError(f"beit.max_block_patches must be >= 0, got {self.max_block_patches}")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ValueError(f"beit.min_aspect must be in (0, 1], got {self.min_aspect}")


@dataclasses.dataclass(kw_only=True)
class BEiTConfig(TrainConfig):
    """A BEiT run: the shared sections plus ``backbone`` and ``beit``."""

    name: str = "beit"
    """Run name (logs)."""
    method: str = "beit"
    """The training method (this class: 'beit')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    """Encoder: a ViT with learned position embeddings."""
    beit: BEiTSection
    """Tokenizer and masking."""
    data: DataConfig
    """Shards and crops (the first global crop is the view)."""


def _sample_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (2**63 - 1)


def beit_masks(seed: int, step: int, first_index: int, batch: int, grid: tuple[int, int], cfg: BEiTSection,
               device: torch.device | None = None) -> torch.Tensor:
    """``(batch, rows * cols)`` bool block masks (True = masked) of images ``first_index + i``, one seeded generator
    per image (see the module docstring)."""
    n = grid[0] * grid[1]
    if cfg.num_mask_patches >= n:
        raise ValueError(f"beit.num_mask_patches ({cfg.num_mask_patches}) must be below the {n} patches of the "
                         f"{grid[0]}x{grid[1]} grid")
    masks = [block_mask(grid, cfg.num_mask_patches, np.random.default_rng(_sample_seed(seed, step, first_index + i)),
                        min_num_patches=cfg.min_block_patches, min_aspect=cfg.min_aspect,
                        max_num_patches=cfg.max_block_patches or None) for i in range(batch)]
    out = torch.from_numpy(np.stack(masks).reshape(batch, n)) if batch else torch.zeros(0, n, dtype=torch.bool)
    return out.to(device)


class BEiTArch(nn.Module):
    """``backbone`` (the ViT), ``head`` (patch output -> code logits), the frozen ``tokenizer`` and the step
    counter that keys the masks."""

    steps: torch.Tensor

    def __init__(self, backbone: BackboneConfig, cfg: BEiTSection, crop_size: int) -> None:
        super().__init__()
        net = backbone.build()
        if not isinstance(getattr(net, "cfg", None), ViTConfig) or getattr(net, "pos_embed", None) is None:
            raise ValueError(f"beit: backbone {backbone.name!r} must be a ViT with learned position embeddings")
        tok, blob = load_tokenizer(cfg.tokenizer, "beit.tokenizer")
        p, tp = net.patch_size, tok.patch_size
        tok_size = cfg.tokenizer_size or crop_size
        if crop_size % p or tok_size % tp or crop_size // p != tok_size // tp:
            raise ValueError(f"beit.tokenizer: {cfg.tokenizer} has {tp} px codes, a {tok_size // tp}-code grid on "
                             f"{tok_size} px (beit.tokenizer_size); the ViT has {p} px patches, a {crop_size // p}-"
                             f"patch grid on {crop_size} px crops: the grids must match")
        if tok.cfg.in_chans != net.cfg.in_chans:
            raise ValueError(f"beit.tokenizer: {cfg.tokenizer} takes {tok.cfg.in_chans} channels, the ViT "
                             f"{net.cfg.in_chans}")
        nn.init.normal_(net.mask_token, std=0.02)
        self.backbone = net
        self.head = nn.Linear(net.embed_dim, tok.cfg.codebook_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        trained_at = int(blob.get("img_size", 0))
        if trained_at and trained_at != tok_size:
            logger.warning("beit.tokenizer: %s was trained on %d px crops, BEiT shows it %d px crops", cfg.tokenizer,
                           trained_at, tok_size)
        self.tokenizer = tok
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


@register_method
class BEiTMethod(Method):
    """BEiT (see the module docstring)."""

    name = "beit"
    config_class = BEiTConfig
    cfg: BEiTConfig
    arch: BEiTArch

    def build(self) -> BEiTArch:
        return BEiTArch(self.cfg.backbone, self.cfg.beit, self.cfg.data.crops.global_size)

    def parts(self) -> list[Part]:
        return [Part("encoder", self.arch.backbone, "trained", forward_methods=("forward_features",)),
                Part("head", self.arch.head, "trained"),
                Part("tokenizer", self.arch.tokenizer, "frozen")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0), patch_size=self.arch.backbone.patch_size)

    def param_groups(self) -> list[dict[str, Any]]:
        """Two groups: weight decay on matrices; none on biases, norms, LayerScale, positions and tokens."""
        return vit_decay_groups(self.arch)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.arch.backbone, "head": self.arch.head}

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen tokenizer's codes ``(B, N)`` of ``images`` (resized to ``beit.tokenizer_size`` when set)."""
        size = self.cfg.beit.tokenizer_size
        if size and size != images.shape[-1]:
            h = round(images.shape[-2] * size / images.shape[-1])
            images = F.interpolate(images.float(), size=(h, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        return self.arch.tokenizer(images, decode=False)["codes"]

    def predict(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Masks, targets and the logits of the masked patches of this rank's ``images`` at ``step``."""
        net, p = self.arch.backbone, self.arch.backbone.patch_size
        b, _, h, w = images.shape
        grid = (h // p, w // p)
        codes = self.targets(images)
        if codes.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"beit.tokenizer: {codes.shape[1]} codes per image for {grid[0] * grid[1]} patches "
                             f"({h}x{w} crops); set beit.tokenizer_size so that the grids match")
        masks = beit_masks(self.cfg.seed, step, rank() * b, b, grid, self.cfg.beit, images.device)
        out = net.forward_features(images, masks)
        logits = self.arch.head(out["x_norm_patchtokens"][masks])
        return {"masks": masks, "codes": codes, "target": codes[masks], "logits": logits}

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        crops = batch["global_crops"]  # crop-major: every image's first crop, then every second crop
        res = self.predict(crops[: len(crops) // 2], int(self.arch.steps))
        logits, target = res["logits"].float(), res["target"]
        total = all_reduce_sum_(torch.tensor(float(target.numel()), device=logits.device)).clamp_min(1.0)
        # sum over this rank's masked patches / the global count, times the world size: the data-parallel mean of
        # the ranks' losses (what their gradients average to) is the mean over every masked patch of the batch
        loss = F.cross_entropy(logits, target, reduction="sum") * world_size() / total
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean() if target.numel() else logits.new_zeros(())
            counts = torch.bincount(res["codes"].flatten(), minlength=logits.shape[-1])
            masked = torch.bincount(target, minlength=logits.shape[-1])
            majority = (masked.max() / masked.sum().clamp_min(1)).float()
        return loss, {"losses": {"mim": loss.detach(), "total": loss.detach()},
                      "extras": {"accuracy": acc, "majority_accuracy": majority, "counts": counts,
                                 "mask_fraction": res["masks"].float().mean()}}

    def after_step(self, values: ScheduleValues) -> None:
        """Advance the step counter that keys the masks."""
        super().after_step(values)
        self.arch.steps.add_(1)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Masked-token accuracy, the most-frequent-code accuracy, masked fraction and target perplexity."""
        e = out["extras"]
        return {"mim_accuracy": float(e["accuracy"]), "majority_accuracy": float(e["majority_accuracy"]),
                "mask_fraction": float(e["mask_fraction"]), "target_perplexity": float(code_perplexity(e["counts"]))}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (+ sidecar) and ``head.pth`` (the code head's state dict)."""
        sd = full_state_dict(self.arch)  # collective: every rank
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        export_backbone_with_config(sd, out / "backbone.pth", name=self.cfg.backbone.name, backbone=self.arch.backbone,
                                    extra={"method": "beit", "beit": dataclasses.asdict(self.cfg.beit)})
        torch.save({k.removeprefix("head."): v.cpu() for k, v in sd.items() if k.startswith("head.")},
                   out / "head.pth")
        logger.info("exported backbone.pth and head.pth to %s", out)

    def summary(self) -> str:
        s, k = self.cfg.beit, self.arch.head.out_features
        n = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in self.arch.named_children()}
        return (f"BEiT: {self.cfg.backbone.name} encoder {n['backbone']:.2f}M + code head ({k} codes), frozen "
                f"tokenizer {n['tokenizer']:.2f}M from {s.tokenizer}, {s.num_mask_patches} masked patches per image")
