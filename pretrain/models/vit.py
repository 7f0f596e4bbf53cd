"""The DINOv2 Vision Transformer (official architecture and parameter names), free of any parallelism.

Token order is ``[CLS, registers..., patches...]``; position embeddings are added before the registers are
inserted, so registers carry none. With ``pos_embed = "rope"`` (DINOv3) there are no stored embeddings: every block
rotates the patch tokens' queries and keys (:mod:`pretrain.layers.rope`), at any resolution. Learned position
embeddings are stored for ``img_size`` and interpolated for any
input whose sides are multiples of the patch size, in the two official modes: plain checkpoints use a scale
factor with a 0.1 offset and no antialias, register checkpoints an exact size with antialias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.layers import BACKENDS, AxialRope, Block, PatchEmbed


@dataclass(kw_only=True)
class ViTConfig:
    """Architecture of a DINOv2 ViT."""

    embed_dim: int
    "Token width."
    depth: int
    "Number of transformer blocks."
    num_heads: int
    "Attention heads (ViT-g uses 24 heads of 64 so flash kernels apply)."
    patch_size: int = 14
    "Patch side in pixels."
    img_size: int = 518
    "Side of the square image the stored position embeddings are for (518 -> 37x37 in official checkpoints)."
    mlp_ratio: float = 4.0
    "MLP width / embed_dim (SwiGLU applies its 2/3 rule to this width)."
    ffn: str = "mlp"
    "'mlp' (GELU, S/B/L) or 'swiglu' (g)."
    num_register_tokens: int = 0
    "Register tokens (4 for the *_reg4 models)."
    init_values: float | None = 1e-5
    "LayerScale init; None disables LayerScale."
    drop_path_rate: float = 0.0
    "Stochastic-depth rate, uniform over blocks (DINOv2: 0.3, 0.4 for L/g)."
    interpolate_offset: float = 0.1
    "Position-embedding interpolation offset: 0.1 (plain checkpoints, scale factor) or 0.0 (exact size)."
    interpolate_antialias: bool = False
    "Antialias in position-embedding interpolation (True for register checkpoints)."
    attn_backend: str = "auto"
    "'auto', 'xformers', 'sdpa' or 'math'."
    in_chans: int = 3
    "Input channels."
    pos_embed: str = "learned"
    "'learned' (DINOv2: stored embeddings, interpolated per resolution) or 'rope' (DINOv3: axial 2-D RoPE)."
    rope_base: float = 100.0
    "RoPE period base (periods base^(2k / (head_dim / 2)))."
    rope_shift: float | None = None
    "RoPE training augmentation: coordinates shifted by uniform [-shift, shift] per axis (None: off)."
    rope_jitter: float | None = None
    "RoPE training augmentation: each axis scaled by log-uniform [1/jitter, jitter] (None: off)."
    rope_rescale: float | None = 2.0
    "RoPE training augmentation: both axes scaled by log-uniform [1/rescale, rescale] (DINOv3: 2; None: off)."

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_chans"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {self.attn_backend!r}")
        if self.interpolate_offset < 0:
            raise ValueError(f"interpolate_offset must be >= 0, got {self.interpolate_offset}")
        if self.pos_embed not in ("learned", "rope"):
            raise ValueError(f"pos_embed must be 'learned' or 'rope', got {self.pos_embed!r}")
        if self.pos_embed == "rope" and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"pos_embed='rope' needs a head width (embed_dim / num_heads = "
                             f"{self.embed_dim // self.num_heads}) divisible by 4")  # fmt: skip


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT backbone with ``forward_features``, packed multi-crop and ``get_intermediate_layers``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.embed_dim = self.num_features = d
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.n_blocks = cfg.depth
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, d)
        grid = cfg.img_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.rope: AxialRope | None = None
        if cfg.pos_embed == "rope":  # no stored position embeddings: rotary tables per grid
            self.pos_embed = None
            self.rope = AxialRope(d // cfg.num_heads, base=cfg.rope_base, shift=cfg.rope_shift,
                                  jitter=cfg.rope_jitter, rescale=cfg.rope_rescale)  # fmt: skip
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        n_reg = cfg.num_register_tokens
        self.register_tokens = nn.Parameter(torch.zeros(1, n_reg, d)) if n_reg else None
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, ffn=cfg.ffn, init_values=cfg.init_values,
                  drop_path=cfg.drop_path_rate, attn_backend=cfg.attn_backend)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    # ----------------------------------------------------------------- init and configuration
    def init_weights(self) -> None:
        """DINOv2 init: trunc-normal(0.02) Linear weights and pos_embed, N(0, 1e-6) cls/registers, zero mask token."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.proj.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) or hasattr(m, "gamma") and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def set_attn_backend(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` ('auto', 'xformers', 'sdpa', 'math')."""
        if backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
        self.cfg.attn_backend = backend
        for blk in self.blocks:
            blk.attn.backend = backend

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm-style optimisers exclude from weight decay (DINOv2 decays tokens; we list none)."""
        return set()

    # ----------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, n_patches: int, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an ``h x w`` pixel input (CLS first), interpolated as the checkpoint expects."""
        n_stored = self.pos_embed.shape[1] - 1
        if n_patches == n_stored and h == w:
            return self.pos_embed
        dtype = self.pos_embed.dtype
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        m = int(math.sqrt(n_stored))
        assert m * m == n_stored, "stored position embeddings must form a square grid"
        h0, w0 = h // self.patch_size, w // self.patch_size
        grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.cfg.interpolate_offset:
            off = self.cfg.interpolate_offset
            kwargs = {"scale_factor": ((h0 + off) / m, (w0 + off) / m)}
        else:
            kwargs = {"size": (h0, w0)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.cfg.interpolate_antialias, **kwargs)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h0, w0)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch-embed, replace masked patches by the mask token, add CLS + position embeddings, insert registers."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"masks must have shape (B, n_patches) = {tuple(tokens.shape[:2])}, "
                                 f"got {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens), dim=1)
        if self.pos_embed is not None:
            tokens = tokens + self.interpolate_pos_encoding(tokens.shape[1] - 1, h, w)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    # ----------------------------------------------------------------- forwards
    def _outputs(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Features of one batch: normalised CLS, register and patch tokens, the pre-norm tokens and the masks."""
        return self.forward_features_list([x], [masks])[0]

    def forward_features_list(
        self, xs: list[torch.Tensor], masks_list: list[torch.Tensor | None] | None = None
    ) -> list[dict[str, torch.Tensor | None]]:
        """Multi-crop forward: crop groups of different resolutions in one packed sequence per block.

        Attention is block-diagonal (per image), so each output equals a separate ``forward_features`` call.
        """
        if masks_list is None:
            masks_list = [None] * len(xs)
        if len(masks_list) != len(xs):
            raise ValueError(f"got {len(xs)} crop groups but {len(masks_list)} masks")
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks_list)]
        rope = self._rope_tables(xs)
        for blk in self.blocks:
            tokens = blk(tokens, rope)
        return [self._outputs(t, m) for t, m in zip(tokens, masks_list)]

    def forward_features_visible(self, x: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """MAE's encoder: CLS, registers and only the patches ``keep`` ``(B, K)`` (indices into the patch grid), each
        with its learned position embedding, through the blocks and the norm. Patch tokens come in ``keep``'s order."""
        if self.rope is not None:
            raise ValueError("forward_features_visible needs learned position embeddings (pos_embed='rope' has none)")
        tokens = self.prepare_tokens(x)
        prefix = 1 + self.num_register_tokens
        if keep.ndim != 2 or keep.shape[0] != x.shape[0]:
            raise ValueError(f"keep must have shape (B, K) with B = {x.shape[0]}, got {tuple(keep.shape)}")
        idx = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        tokens = torch.cat((tokens[:, :prefix], tokens[:, prefix:].gather(1, idx)), dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self._outputs(tokens, None)

    def _rope_tables(self, xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, int]] | None:
        """Rotary tables per crop group (one augmentation draw per group in training), or None."""
        if self.rope is None:
            return None
        p, prefix = self.patch_size, 1 + self.num_register_tokens
        return [(*self.rope(x.shape[-2] // p, x.shape[-1] // p, x.device), prefix) for x in xs]

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """The normalised CLS token ``(B, D)``."""
        return self.forward_features(x, masks)["x_norm_clstoken"]

    def get_intermediate_layers(self, x: torch.Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """Outputs of the last ``n`` blocks (or of the block indices in ``n``), as the official API returns them.

        Returns a tuple of patch tokens ``(B, N, D)`` (``(B, D, h, w)`` with ``reshape``), or of
        ``(patch_tokens, class_token)`` pairs with ``return_class_token``.
        """
        wanted = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= self.n_blocks:
            raise ValueError(f"n={n!r} selects blocks outside 0..{self.n_blocks - 1}")
        tokens = self.prepare_tokens(x)
        rope = self._rope_tables([x])
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, rope)
            if i in wanted:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(o) for o in outputs]
        cls = [o[:, 0] for o in outputs]
        patches = [o[:, 1 + self.num_register_tokens :] for o in outputs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            patches = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token:
            return tuple(zip(patches, cls))
        return tuple(patches)
