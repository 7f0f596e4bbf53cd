"""Axial 2-D rotary position embedding (RoPE) as DINOv3 uses it, with its coordinate augmentations.

Patch ``(i, j)`` of an ``h x w`` grid sits at ``y = 2 (i + 0.5) / h - 1``, ``x = 2 (j + 0.5) / w - 1``: every
resolution spans the same box ``[-1, 1]^2``, so one checkpoint runs at any resolution without interpolating
anything (a 2x larger image only samples the box twice as densely). A head of width ``D`` is rotated by
``D / 4`` frequencies per axis: angle ``2 pi c / p_k`` with periods ``p_k = base^(2k / (D / 2))``,
``k = 0 .. D/4 - 1``; the ``D / 2`` angles (the y ones, then the x ones) are used twice, once for each half of
the head (``x cos + rotate_half(x) sin``), so ``q . k`` after rotation depends on the coordinate *difference*.

In training the coordinates can be augmented (DINOv3): shifted by a uniform ``[-shift, shift]`` per axis,
scaled per axis by a log-uniform factor in ``[1/jitter, jitter]`` and both axes by one log-uniform factor in
``[1/rescale, rescale]`` (drawn from the global torch RNG once per call, so a whole crop group shares them).
Only patch tokens are rotated; CLS and register tokens carry no position.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["AxialRope", "apply_rope", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[a, b] -> [-b, a]`` over the two halves of the last dimension."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., N, D) by the tables ``cos``, ``sin`` (N, D), in fp32, returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class AxialRope(nn.Module):
    """Cos / sin tables of a patch grid for one attention head width (no learnable weights)."""

    def __init__(self, head_dim: int, *, base: float = 100.0, shift: float | None = None,
                 jitter: float | None = None, rescale: float | None = None) -> None:  # fmt: skip
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
        if base <= 1.0:
            raise ValueError(f"rope base must be > 1, got {base}")
        for name, v in (("shift", shift), ("jitter", jitter), ("rescale", rescale)):
            if v is not None and (v <= 0 or (name != "shift" and v < 1)):
                raise ValueError(f"rope {name} must be {'> 0' if name == 'shift' else '>= 1'} or None, got {v}")
        self.head_dim = head_dim
        self.shift, self.jitter, self.rescale = shift, jitter, rescale
        k = torch.arange(head_dim // 4, dtype=torch.float64)
        self.register_buffer("periods", (base ** (2 * k / (head_dim // 2))).float(), persistent=False)

    def coords(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        """(h * w, 2) patch-centre coordinates (y, x) in [-1, 1], augmented in training mode."""
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * (2.0 / h) - 1.0
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * (2.0 / w) - 1.0
        c = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
        if self.training:
            if self.shift is not None:
                c = c + torch.empty(2).uniform_(-self.shift, self.shift).to(c.device)
            if self.jitter is not None:
                c = c * torch.empty(2).uniform_(-math.log(self.jitter), math.log(self.jitter)).exp().to(c.device)
            if self.rescale is not None:
                c = c * torch.empty(1).uniform_(-math.log(self.rescale), math.log(self.rescale)).exp().to(c.device)
        return c

    def tables(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each (N, head_dim) fp32, for (N, 2) coordinates (y, x)."""
        c = coords.float()
        angles = 2 * math.pi * c[:, :, None] / self.periods.to(c.device)  # (N, 2, D/4)
        angles = angles.reshape(len(c), -1).repeat(1, 2)  # (N, D)
        return angles.cos(), angles.sin()

    def forward(self, h: int, w: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each (h * w, head_dim) fp32, for an ``h x w`` patch grid."""
        return self.tables(self.coords(h, w, device))
