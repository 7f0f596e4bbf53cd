"""DINOv2 / BEiT block masking of global crops for the iBOT loss.

Per batch of ``n_images`` global crops (DINOv2 ``collate_data_and_cast``): ``int(n_images * mask_probability)``
images get a mask; image i of those draws its mask ratio uniformly in bin i of
``linspace(ratio_min, ratio_max, n_masked + 1)`` (stratified), the rest get none, and the list is shuffled.
A mask of ratio r covers ``int(N * r)`` patches, grown by random rectangles (BEiT ``MaskingGenerator``): target
area uniform in [min_num_patches, remaining budget], log-uniform aspect in [min_aspect, max_aspect], 10 tries per
block, at most ``max_num_patches`` (0.5 N) new patches per block, stopping when a block adds nothing.

Difference from the reference: a rectangle whose rounded size falls below ``min_num_patches`` is rejected and
retried, so every connected masked region has at least ``min_num_patches`` patches (the reference's rounding can
place 3-patch blocks). The mask count can therefore end a few patches short of the target, as in the reference.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

__all__ = [
    "MaskBatch",
    "MaskingConfig",
    "block_mask",
    "mask_batch",
    "masks_upperbound",
    "sample_mask_batch",
    "sample_masks",
]


@dataclasses.dataclass(kw_only=True)
class MaskingConfig:
    """Block masking of global crops (DINOv2 defaults)."""

    mask_probability: float = 0.5
    """Fraction of global-crop images that get a mask (``int(n * p)`` images)."""
    ratio_min: float = 0.1
    """Lowest mask ratio (fraction of patches)."""
    ratio_max: float = 0.5
    """Highest mask ratio."""
    min_num_patches: int = 4
    """Smallest block, in patches."""
    min_aspect: float = 0.3
    """Smallest block aspect ratio (height / width)."""
    max_aspect: float | None = None
    """Largest aspect ratio; None means 1 / min_aspect (3.33)."""
    max_block_fraction: float = 0.5
    """Largest number of new patches per block, as a fraction of the grid (0.5 N = 128 of 256 in DINOv2)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(f"masking.mask_probability must be in [0, 1], got {self.mask_probability}")
        if not 0.0 <= self.ratio_min <= self.ratio_max <= 1.0:
            raise ValueError(
                f"masking.ratio_min / ratio_max must satisfy 0 <= min <= max <= 1, got {self.ratio_min}, "
                f"{self.ratio_max}"
            )
        if self.min_num_patches < 1:
            raise ValueError(f"masking.min_num_patches must be >= 1, got {self.min_num_patches}")
        if self.min_aspect <= 0:
            raise ValueError(f"masking.min_aspect must be > 0, got {self.min_aspect}")
        if self.max_aspect is not None and self.max_aspect < self.min_aspect:
            raise ValueError(f"masking.max_aspect ({self.max_aspect}) must be >= min_aspect ({self.min_aspect})")
        if not 0.0 < self.max_block_fraction <= 1.0:
            raise ValueError(f"masking.max_block_fraction must be in (0, 1], got {self.max_block_fraction}")


def block_mask(
    grid_hw: tuple[int, int],
    num_masking_patches: int,
    generator: np.random.Generator,
    *,
    min_num_patches: int = 4,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    max_num_patches: int | None = None,
) -> np.ndarray:
    """One (H, W) bool mask of about ``num_masking_patches`` patches made of rectangular blocks."""
    height, width = grid_hw
    max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    max_block = num_masking_patches if max_num_patches is None else max_num_patches
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masking_patches:
        budget = min(num_masking_patches - count, max_block)
        delta = 0
        for _ in range(10):
            area = generator.uniform(min_num_patches, max(budget, min_num_patches))
            aspect = math.exp(generator.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h * w < min_num_patches or not (w < width and h < height):
                continue
            top = int(generator.integers(0, height - h + 1))
            left = int(generator.integers(0, width - w + 1))
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= budget:
                mask[top : top + h, left : left + w] = True
                delta = new
                break
        if delta == 0:
            break
        count += delta
    return mask


def _ratio_bins(n_images: int, mask_probability: float, ratio_min: float, ratio_max: float) -> np.ndarray:
    n_masked = int(n_images * mask_probability)
    return np.linspace(ratio_min, ratio_max, n_masked + 1)


def masks_upperbound(n_images: int, n_patches: int, cfg: MaskingConfig | None = None) -> int:
    """Static bound on the masked patches of a batch: ``sum_i int(N * bin_hi_i)`` (DINOv2 ``upperbound``)."""
    cfg = cfg or MaskingConfig()
    bins = _ratio_bins(n_images, cfg.mask_probability, cfg.ratio_min, cfg.ratio_max)
    return int(sum(int(n_patches * hi) for hi in bins[1:]))


def sample_masks(
    n_images: int,
    grid_hw: tuple[int, int],
    *,
    generator: np.random.Generator,
    cfg: MaskingConfig | None = None,
) -> torch.Tensor:
    """(n_images, H * W) bool masks (True = masked) for a batch of global crops, DINOv2-stratified and shuffled."""
    cfg = cfg or MaskingConfig()
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    height, width = grid_hw
    if height < 1 or width < 1:
        raise ValueError(f"grid_hw must be positive, got {grid_hw}")
    n_patches = height * width
    bins = _ratio_bins(n_images, cfg.mask_probability, cfg.ratio_min, cfg.ratio_max)
    max_block = int(cfg.max_block_fraction * n_patches)
    masks = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        target = int(n_patches * generator.uniform(lo, hi))
        masks.append(block_mask(grid_hw, target, generator, min_num_patches=cfg.min_num_patches,
                                min_aspect=cfg.min_aspect, max_aspect=cfg.max_aspect, max_num_patches=max_block))
    masks += [np.zeros(grid_hw, dtype=bool)] * (n_images - len(masks))
    order = generator.permutation(n_images)
    stacked = np.stack([masks[i] for i in order]) if n_images else np.zeros((0, height, width), dtype=bool)
    return torch.from_numpy(stacked.reshape(n_images, n_patches))


@dataclasses.dataclass
class MaskBatch:
    """Masks plus what the collate hands the meta-architecture (DINOv2 collate keys)."""

    masks: torch.Tensor
    """(n_images, N) bool, True = masked."""
    mask_indices: torch.Tensor
    """(M,) long indices into ``masks.flatten()`` of the masked patches (image-major)."""
    masks_weight: torch.Tensor
    """(M,) float32 ``1 / m_b`` of each masked patch's image (iBOT weighting)."""
    n_masked_patches: torch.Tensor
    """(1,) long M."""
    upperbound: int
    """Static bound on M for fixed-size buffers."""


def mask_batch(masks: torch.Tensor, upperbound: int) -> MaskBatch:
    """Derive indices, per-patch weights and counts from (n_images, N) bool ``masks``."""
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (n_images, n_patches), got {masks.dtype} {tuple(masks.shape)}")
    indices = masks.flatten().nonzero().flatten()
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(torch.float32)
    weights = per_image[:, None].expand_as(masks)[masks]
    n_masked = torch.full((1,), indices.numel(), dtype=torch.long)
    if indices.numel() > upperbound:
        raise ValueError(f"{indices.numel()} masked patches exceed upperbound {upperbound}")
    return MaskBatch(masks=masks, mask_indices=indices, masks_weight=weights, n_masked_patches=n_masked,
                     upperbound=upperbound)


def sample_mask_batch(
    n_images: int, grid_hw: tuple[int, int], *, generator: np.random.Generator, cfg: MaskingConfig | None = None
) -> MaskBatch:
    """:func:`sample_masks` then :func:`mask_batch` with the config's ``upperbound``."""
    cfg = cfg or MaskingConfig()
    masks = sample_masks(n_images, grid_hw, generator=generator, cfg=cfg)
    return mask_batch(masks, masks_upperbound(n_images, grid_hw[0] * grid_hw[1], cfg))
