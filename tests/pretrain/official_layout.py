"""The official DINOv2 backbone key layout, written from the published checkpoints' key/shape lists.

Independent of ``pretrain.models`` on purpose: tests build "official" checkpoints from this table.
"""

from __future__ import annotations

import torch

OFFICIAL = {
    # name: (dim, depth, heads, ffn)
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}
PARAMS_M = {"vits14": 22.06, "vitb14": 86.58, "vitl14": 304.37, "vitg14": 1136.48}


def official_shapes(name: str, depth: int | None = None, grid: int = 37) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official ``dinov2_<name>[_reg4]_pretrain.pth`` (optionally with fewer blocks)."""
    base, reg = (name[:-5], 4) if name.endswith("_reg4") else (name, 0)
    dim, full_depth, _, ffn = OFFICIAL[base]
    depth = full_depth if depth is None else depth
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + 1, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if reg:
        shapes["register_tokens"] = (1, reg, dim)
    hidden = 4 * dim
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
            p + "ls1.gamma": (dim,),
            p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
            p + "ls2.gamma": (dim,),
        })
        if ffn == "mlp":
            shapes.update({p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,),
                           p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,)})
        else:
            inner = 4096  # (int(6144 * 2 / 3) + 7) // 8 * 8
            shapes.update({p + "mlp.w12.weight": (2 * inner, dim), p + "mlp.w12.bias": (2 * inner,),
                           p + "mlp.w3.weight": (dim, inner), p + "mlp.w3.bias": (dim,)})
    return shapes


def random_official_state_dict(name: str, depth: int | None = None, grid: int = 37, seed: int = 0
                               ) -> dict[str, torch.Tensor]:
    """Random weights under the official names; LayerScale near 1 and norms near identity like a trained model."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_shapes(name, depth, grid).items():
        if k.endswith("gamma"):
            t = 0.5 + 0.5 * torch.rand(shape, generator=g)
        elif "norm" in k and k.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.05 * torch.randn(shape, generator=g)
        sd[k] = t
    return sd
