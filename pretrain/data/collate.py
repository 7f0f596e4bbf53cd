"""Collate multi-crop samples and global-crop masks into one DINOv2 training batch.

Layouts are crop-major, as the official ``collate_data_and_cast``: ``global_crops[c * B + b]`` is global crop
``c`` of sample ``b`` (all first global crops, then all second ones), and likewise for local crops. ``masks``
rows follow ``global_crops`` rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from pretrain.data.masking import MaskBatch, MaskingConfig, sample_mask_batch

__all__ = ["MaskFn", "collate_multicrop"]

#: ``(n_images, grid_hw, *, generator) -> MaskBatch`` (default: :func:`pretrain.data.masking.sample_mask_batch`).
MaskFn = Callable[..., MaskBatch]


def collate_multicrop(
    samples: Sequence[dict[str, Any]],
    *,
    patch_size: int,
    generator: np.random.Generator,
    masking: MaskingConfig | None = None,
    mask_fn: MaskFn | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Stack ``samples`` (``{"global": [t, t], "local": [t] * n, "label"?: int, "key"?: str}``) into a batch.

    Returns a dict with
    ``global_crops`` (2B, 3, H, W) and ``local_crops`` (nB, 3, h, w) in ``dtype``, crop-major;
    ``masks`` (2B, N) bool with N = (H / patch_size) * (W / patch_size);
    ``mask_indices`` (M,) long indices into ``masks.flatten()``; ``masks_weight`` (M,) float32, 1 / m_b for each
    masked patch of image b; ``n_masked_patches`` (1,) long M; ``upperbound`` int static bound on M;
    ``labels`` (B,) long when every sample has a ``"label"``; ``keys`` list of the samples' ``"key"`` (or None).
    Masks come from ``mask_fn`` (default: block masking with ``masking``) drawn with ``generator``.
    """
    if not samples:
        raise ValueError("collate_multicrop needs at least one sample")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    n_global = len(samples[0]["global"])
    n_local = len(samples[0]["local"])
    for i, s in enumerate(samples):
        if len(s["global"]) != n_global or len(s["local"]) != n_local:
            raise ValueError(f"sample {i} has {len(s['global'])} global / {len(s['local'])} local crops, "
                             f"sample 0 has {n_global} / {n_local}")
    global_crops = torch.stack([s["global"][c] for c in range(n_global) for s in samples]).to(dtype)
    if n_local:
        local_crops = torch.stack([s["local"][c] for c in range(n_local) for s in samples]).to(dtype)
    else:
        local_crops = torch.empty((0, *global_crops.shape[1:2], 0, 0), dtype=dtype)
    height, width = global_crops.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"global crop size {height}x{width} is not a multiple of patch_size {patch_size}")
    grid_hw = (height // patch_size, width // patch_size)
    fn = mask_fn if mask_fn is not None else partial(sample_mask_batch, cfg=masking or MaskingConfig())
    mb = fn(global_crops.shape[0], grid_hw, generator=generator)
    if tuple(mb.masks.shape) != (global_crops.shape[0], grid_hw[0] * grid_hw[1]):
        raise ValueError(f"mask_fn returned masks of shape {tuple(mb.masks.shape)}, expected "
                         f"({global_crops.shape[0]}, {grid_hw[0] * grid_hw[1]})")
    batch: dict[str, Any] = {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": mb.masks,
        "mask_indices": mb.mask_indices,
        "masks_weight": mb.masks_weight,
        "n_masked_patches": mb.n_masked_patches,
        "upperbound": mb.upperbound,
        "keys": [s.get("key") for s in samples],
    }
    if all("label" in s for s in samples):
        batch["labels"] = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    return batch
