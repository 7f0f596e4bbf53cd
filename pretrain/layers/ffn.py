"""Feed-forward layers: the GELU MLP (ViT-S/B/L) and SwiGLU (ViT-g), with official DINOv2 parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(hidden_dim: int) -> int:
    """DINOv2's fused SwiGLU width: 2/3 of the MLP width rounded up to a multiple of 8 (6144 -> 4096)."""
    return (int(hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)``; ``hidden_dim`` is the MLP width before the 2/3 rule."""

    def __init__(self, dim: int, hidden_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        inner = swiglu_hidden_dim(hidden_dim)
        self.w12 = nn.Linear(dim, 2 * inner, bias=bias)
        self.w3 = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)
