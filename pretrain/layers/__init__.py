"""ViT building blocks: attention with backend choice, blocks, MLP/SwiGLU, LayerScale, patch embedding."""

from .attention import BACKENDS, Attention, resolve_backend, xformers_available
from .block import Block, LayerScale
from .ffn import Mlp, SwiGLUFFN, swiglu_hidden_dim
from .patch_embed import PatchEmbed

__all__ = [
    "BACKENDS", "Attention", "Block", "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN", "resolve_backend",
    "swiglu_hidden_dim", "xformers_available",
]
