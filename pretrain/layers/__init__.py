"""ViT building blocks: attention with backend choice, blocks, MLP/SwiGLU, LayerScale, patch embedding."""

from .attention import BACKENDS, Attention, resolve_backend, xformers_available
from .block import Block, LayerScale
from .ffn import Mlp, SwiGLUFFN, swiglu_hidden_dim
from .patch_embed import PatchEmbed
from .rope import AxialRope, apply_rope

__all__ = [
    "BACKENDS", "Attention", "AxialRope", "Block", "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN", "apply_rope",
    "resolve_backend",
    "swiglu_hidden_dim", "xformers_available",
]
