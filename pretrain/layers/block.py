"""Pre-norm transformer block with LayerScale and efficient stochastic depth, on packed multi-crop batches.

A block works on a list of crop groups ``[(B_g, N_g, D), ...]``. Token-wise layers (norms, projections, MLP) run
once on all tokens concatenated, attention runs per image (see ``attention.py``), so one call handles 2 global +
N local crops. In training mode with drop-path rate ``d > 0``, each residual branch runs on a random subset of
``max(1, int(B_g * (1 - d)))`` images of every group and its output is added back scaled by ``B_g / subset``
(DINOv2's "efficient stochastic depth"): the skipped images cost no compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import Attention, Rope
from .ffn import Mlp, SwiGLUFFN


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (official name ``ls1.gamma`` / ``ls2.gamma``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, ffn: str = "mlp",
                 init_values: float | None = 1e-5, drop_path: float = 0.0, attn_backend: str = "auto",
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn == "mlp":
            self.mlp = Mlp(dim, hidden)
        elif ffn == "swiglu":
            self.mlp = SwiGLUFFN(dim, hidden)
        else:
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path

    # Branches take packed tokens (T, D) with their layout and return (T, D).
    def _attn_branch(self, x: torch.Tensor, layout: list[tuple[int, int]], rope: Rope = None) -> torch.Tensor:
        y = self.norm1(x)
        return self.ls1(self.attn(y, layout) if rope is None else self.attn(y, layout, rope))

    def _mlp_branch(self, x: torch.Tensor, layout: list[tuple[int, int]]) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor | list[torch.Tensor], rope: Rope = None) -> torch.Tensor | list[torch.Tensor]:
        """Apply the block to one ``(B, N, D)`` tensor or a list of crop groups (returns the same structure);
        ``rope``: per crop group, the rotary tables of its patch tokens (see :meth:`Attention.forward`)."""
        if isinstance(x, torch.Tensor):
            return self.forward([x], rope)[0]
        xs = self._residual(list(x), lambda flat, layout: self._attn_branch(flat, layout, rope))
        return self._residual(xs, self._mlp_branch)

    def _residual(self, xs: list[torch.Tensor], branch: Callable) -> list[torch.Tensor]:
        if self.training and self.drop_path > 0.0:
            return self._residual_subset(xs, branch)
        layout = [(t.shape[0], t.shape[1]) for t in xs]
        flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        out = branch(flat, layout)
        return [t + o.reshape(t.shape) for t, o in zip(xs, out.split([b * n for b, n in layout]))]

    def _residual_subset(self, xs: list[torch.Tensor], branch: Callable) -> list[torch.Tensor]:
        keep = [max(1, int(t.shape[0] * (1.0 - self.drop_path))) for t in xs]
        idx = [torch.randperm(t.shape[0], device=t.device)[:k] for t, k in zip(xs, keep)]
        layout = [(k, t.shape[1]) for t, k in zip(xs, keep)]
        flat = torch.cat([t[i].reshape(-1, t.shape[-1]) for t, i in zip(xs, idx)])
        out = branch(flat, layout)
        results = []
        for t, i, o, (k, n) in zip(xs, idx, out.split([k * n for k, n in layout]), layout):
            results.append(torch.index_add(t, 0, i, o.reshape(k, n, -1).to(t.dtype), alpha=t.shape[0] / k))
        return results
