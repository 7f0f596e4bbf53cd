"""Multi-head self-attention with selectable backends and packed (block-diagonal) multi-crop sequences.

Backends:
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA tensors only); packed crops use a
  ``BlockDiagonalMask`` over one concatenated sequence, as DINOv2 does.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU, the CPU
  flash kernel on CPU); packed crops run one SDPA call per crop group, which is exactly block-diagonal attention
  without materialising a mask.
- ``math``: explicit ``softmax(q k^T / sqrt(d)) v`` with the softmax in fp32 (reference and debugging).
- ``auto``: xformers when importable and the tensors are on CUDA, otherwise sdpa.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "xformers", "sdpa", "math")

#: A packed batch layout: one ``(n_images, seq_len)`` pair per crop group, in concatenation order.
Layout = Sequence[tuple[int, int]]
#: Per crop group: ``None`` or the rotary ``(cos, sin, prefix)`` of its patch tokens (:mod:`pretrain.layers.rope`).
Rope = Sequence[tuple[torch.Tensor, torch.Tensor, int] | None] | None


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    """True when ``xformers.ops`` imports (its kernels still need CUDA tensors)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build raising at import
        logger.debug("xformers unavailable: %s", exc)
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for tensors on ``device``; fail clearly when one cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if backend == "xformers":
        if not xformers_available():
            raise RuntimeError(
                "attn_backend='xformers' was requested but xformers is not importable; "
                "install the gpu extra (pip install 'dinoforge[gpu]') or use attn_backend='sdpa'"
            )
        if device.type != "cuda":
            raise RuntimeError(
                f"attn_backend='xformers' needs CUDA tensors, got tensors on {device.type}; use 'sdpa' or 'auto'"
            )
    return backend


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention on (B, H, N, Dh) tensors, softmax in fp32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class Attention(nn.Module):
    """Self-attention with a fused ``qkv`` projection (official DINOv2 parameter names ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, proj_bias: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, layout: Layout | None = None, rope: Rope = None) -> torch.Tensor:
        """Attend within each image.

        Args:
            x: ``(B, N, D)`` for one crop group, or ``(T, D)`` packed tokens of several groups when ``layout`` is
                given (``T = sum(b * n for b, n in layout)``).
            layout: the packed layout; attention never crosses image boundaries.
            rope: per crop group, ``None`` or ``(cos, sin, prefix)``: queries and keys of its tokens after the
                first ``prefix`` (CLS, registers) are rotated by the ``(N - prefix, head_dim)`` tables
                (:mod:`pretrain.layers.rope`), on every backend.
        """
        if layout is None:
            b, n, d = x.shape
            return self.forward(x.reshape(b * n, d), [(b, n)], rope).reshape(b, n, d)
        t, d = x.shape
        backend = resolve_backend(self.backend, x.device)
        qkv = self.qkv(x).reshape(t, 3, self.num_heads, self.head_dim)
        if rope is not None:
            qkv = self._rotate(qkv, layout, rope)
        if backend == "xformers":
            out = self._xformers(qkv, layout)
        else:
            outs = []
            for chunk, (b, n) in zip(qkv.split([b * n for b, n in layout]), layout):
                q, k, v = chunk.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                o = F.scaled_dot_product_attention(q, k, v) if backend == "sdpa" else _math_attention(q, k, v)
                outs.append(o.transpose(1, 2).reshape(b * n, d))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.proj(out)

    def _rotate(self, qkv: torch.Tensor, layout: Layout, rope: list) -> torch.Tensor:
        """Rotate the queries and keys of every crop group that has rotary tables."""
        if len(rope) != len(layout):
            raise ValueError(f"rope has {len(rope)} entries for {len(layout)} crop groups")
        out = []
        for chunk, (b, n), r in zip(qkv.split([b * n for b, n in layout]), layout, rope):
            if r is None:
                out.append(chunk)
                continue
            cos, sin, prefix = r
            c = chunk.reshape(b, n, 3, self.num_heads, self.head_dim)
            qk = c[:, prefix:, :2].permute(0, 2, 3, 1, 4)  # (b, 2, H, N - prefix, Dh)
            qk = apply_rope(qk, cos, sin).permute(0, 3, 1, 2, 4)
            c = torch.cat([c[:, :prefix], torch.cat([qk, c[:, prefix:, 2:]], dim=2)], dim=1)
            out.append(c.reshape(b * n, 3, self.num_heads, self.head_dim))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _xformers(self, qkv: torch.Tensor, layout: Layout) -> torch.Tensor:
        from xformers.ops import memory_efficient_attention

        t = qkv.shape[0]
        if len(layout) == 1:
            b, n = layout[0]
            q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
            out = memory_efficient_attention(q, k, v)
        else:
            q, k, v = qkv.reshape(1, t, 3, self.num_heads, self.head_dim).unbind(2)
            seqlens = tuple(n for b, n in layout for _ in range(b))
            out = memory_efficient_attention(q, k, v, attn_bias=_block_diagonal_mask(seqlens))
        return out.reshape(t, -1)


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(seqlens: tuple[int, ...]):  # pragma: no cover - needs CUDA + xformers
    from xformers.ops import fmha

    return fmha.BlockDiagonalMask.from_seqlens(list(seqlens))
