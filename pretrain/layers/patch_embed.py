"""Image to patch tokens with a strided convolution (official name ``patch_embed.proj``)."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """``(B, 3, H, W) -> (B, H/p * W/p, D)``; H and W must be multiples of the patch size."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                f"resize or crop to e.g. {h // p * p}x{w // p * p}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)
