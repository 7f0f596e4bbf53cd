"""``method = "mae"``: masked autoencoders (He, Chen, Xie, Li, Dollar & Girshick 2022, "Masked Autoencoders Are
Scalable Vision Learners").

- View: one crop per image (the first of the loader's two global crops): random resized crop (scale 0.2-1) and
  flip, no colour augmentation (set by the recipe).
- Masking: per image a random ``mae.mask_ratio`` (0.75) of the patches is masked: ``N - round(N * ratio)`` are kept
  (the released code keeps ``int(N * (1 - ratio))``: the same for N = 196), chosen by argsort of uniform noise from
  a generator seeded by (``seed``, the step counter buffer, the global sample index), so the draws do not depend
  on the split over ranks and a resume restores them.
- Encoder: the ViT backbone on the CLS token (+ registers) and the visible patches only
  (:meth:`DinoVisionTransformer.forward_features_visible`), then its final norm. Its position embeddings are the
  backbone's learned ones (the paper: fixed 2-D sin-cos), its init is DINOv2's (the paper: xavier), and LayerScale
  follows ``backbone.overrides.init_values`` (the recipes set 0: none, as the paper's ViT).
- Decoder: a linear map to ``decoder_dim``, one shared learned mask token, the sequence unshuffled to the full grid,
  fixed 2-D sin-cos position embeddings (the paper's; none for CLS / registers), ``decoder_depth`` pre-norm
  transformer blocks (:class:`pretrain.layers.Block`, no LayerScale), a norm and a linear prediction of the
  ``patch_size ** 2 * 3`` pixels of every patch (pixel order row, column, channel, as the released ``patchify``).
- Target and loss: the network's input image (ImageNet-normalised, as the paper), patchified; with
  ``mae.norm_pix_loss`` each patch minus its mean over its pixels, over ``sqrt(var + 1e-6)`` (unbiased variance,
  as the released code). Squared error averaged over a patch's pixels, then over the masked patches only.
- Optimizer (recipe): AdamW (0.9, 0.95), lr 1.5e-4 x batch / 256, wd 0.05, cosine with 40 warm-up epochs; no weight
  decay on biases, norms, LayerScale, position embeddings and the CLS / register / mask tokens (the released code
  decays its (1, 1, D) CLS and mask tokens). The backbone's unused DINOv2 mask token is frozen.
- Export: ``backbone.pth`` (+ ``.json`` sidecar; a plain ViT for the full token set) and ``decoder.pth``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import full_state_dict
from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.layers import Block
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method, vit_decay_groups
from pretrain.methods.dinov2 import export_backbone_with_config
from pretrain.metrics import vit_forward_flops
from pretrain.models import ViTConfig
from pretrain.optim import ScheduleValues
from pretrain.ssl.meta_arch import BackboneConfig
from pretrain.utils.dist import rank

__all__ = ["MAEArch", "MAEConfig", "MAEDecoder", "MAEMethod", "MAESection", "mae_loss", "patchify", "random_masking",
           "sincos_2d", "unpatchify"]

logger = logging.getLogger("pretrain")



@dataclasses.dataclass(kw_only=True)
class MAESection:
    """MAE settings (defaults: the paper's ViT-L/16 values)."""

    mask_ratio: float = 0.75
    """Fraction of the patches of every image that is masked."""
    decoder_dim: int = 512
    """Decoder width."""
    decoder_depth: int = 8
    """Decoder transformer blocks."""
    decoder_heads: int = 16
    """Decoder attention heads."""
    decoder_mlp_ratio: float = 4.0
    """Decoder MLP width / decoder_dim."""
    norm_pix_loss: bool = True
    """Per-patch normalised pixel targets."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"mae.{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"mae.decoder_dim ({self.decoder_dim}) must be divisible by mae.decoder_heads "
                             f"({self.decoder_heads})")
        if self.decoder_dim % 4:
            raise ValueError(f"mae.decoder_dim must be a multiple of 4 (2-D sin-cos positions), got {self.decoder_dim}")
        if self.decoder_mlp_ratio <= 0:
            raise ValueError(f"mae.decoder_mlp_ratio must be > 0, got {self.decoder_mlp_ratio}")


@dataclasses.dataclass(kw_only=True)
class MAEConfig(TrainConfig):
    """An MAE run: the shared sections plus ``backbone`` and ``mae``."""

    name: str = "mae"
    """Run name (logs)."""
    method: str = "mae"
    """The training method (this class: 'mae')."""
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    """Encoder: a ViT with learned position embeddings."""
    mae: MAESection = dataclasses.field(default_factory=MAESection)
    """Masking, decoder and target."""
    data: DataConfig
    """Shards and crops (the first global crop is the view)."""


# ------------------------------------------------------------------------------------------------ functions
def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H / p) (W / p), p * p * C)``: patches in raster order, pixels as (row, column,
    channel)."""
    b, c, h, w = images.shape
    if h % p or w % p:
        raise ValueError(f"image sides {h}x{w} must be multiples of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """The inverse of :func:`patchify` for a ``grid = (rows, cols)`` of patches."""
    b, (gh, gw) = patches.shape[0], grid
    x = patches.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * p, gw * p)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``(rows * cols, dim)`` in raster order (float64): the first half of the
    channels encodes the column, the second the row, each as ``[sin(pos w_k), cos(pos w_k)]`` with
    ``w_k = 10000 ** (-k / (dim / 4))``."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    q = dim // 4
    omega = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (cols.flatten(), rows.flatten()):
        angle = pos[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)


def _sample_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (2**63 - 1)


def random_masking(seed: int, step: int, first_index: int, batch: int, n: int, ratio: float,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image ``first_index + i``: ``(keep (B, K), ids_restore (B, N), mask (B, N) float, 1 = masked)``.

    ``K = n - round(n * ratio)`` patches with the smallest noise of a generator seeded by (seed, step, index) are
    kept, in that order; ``ids_restore`` puts ``[kept..., masked...]`` back into raster order."""
    n_keep = n - round(n * ratio)
    if n_keep < 1:
        raise ValueError(f"mae.mask_ratio {ratio} keeps no patch of {n}")
    gens = (torch.Generator().manual_seed(_sample_seed(seed, step, first_index + i)) for i in range(batch))
    noise = torch.stack([torch.rand(n, generator=g) for g in gens]) if batch else torch.zeros(0, n)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(batch, n)
    mask[:, :n_keep] = 0
    mask = mask.gather(1, restore)
    return shuffle[:, :n_keep].to(device), restore.to(device), mask.to(device)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool = True
             ) -> torch.Tensor:
    """MAE's loss: ``pred`` and ``target`` ``(B, N, P)`` patches, ``mask`` ``(B, N)`` (1 = masked, counted).

    With ``norm_pix`` each target patch is standardised over its pixels (unbiased variance + 1e-6). The squared error
    is averaged over the pixels of a patch, then over the masked patches. fp32."""
    target = target.float()
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred.float() - target).square().mean(-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------------ modules
class MAEDecoder(nn.Module):
    """MAE's lightweight decoder (see the module docstring); ``blocks`` are sharded one by one like a ViT's."""

    def __init__(self, in_dim: int, cfg: MAESection, patch_size: int, in_chans: int = 3,
                 attn_backend: str = "auto") -> None:
        super().__init__()
        d = cfg.decoder_dim
        self.dim, self.patch_size, self.in_chans = d, patch_size, in_chans
        self.embed = nn.Linear(in_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(Block(d, cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio, init_values=None,
                                          attn_backend=attn_backend) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pred = nn.Linear(d, patch_size * patch_size * in_chans)
        self._pos: dict[tuple[int, int], torch.Tensor] = {}
        for m in self.modules():  # the released init: xavier-uniform linears, zero biases, mask token N(0, 0.02)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def positions(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The fixed sin-cos table of ``grid`` (cached in float64 on the CPU)."""
        if grid not in self._pos:
            self._pos[grid] = sincos_2d(self.dim, grid)
        return self._pos[grid].to(device=device, dtype=dtype)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int], prefix: int
                ) -> torch.Tensor:
        """Predicted pixels ``(B, N, p * p * C)`` of every patch from the encoder's output ``latent`` (``prefix``
        CLS / register tokens, then the kept patches in ``keep`` order)."""
        x = self.embed(latent)
        b, n = ids_restore.shape
        visible = x[:, prefix:]
        masked = self.mask_token.to(x.dtype).expand(b, n - visible.shape[1], -1)
        full = torch.cat((visible, masked), dim=1).gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat((x[:, :prefix], full + self.positions(grid, x.device, x.dtype)), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x[:, prefix:]))


class MAEArch(nn.Module):
    """``backbone`` (the ViT encoder), ``decoder`` and the step counter that keys the masks."""

    steps: torch.Tensor

    def __init__(self, backbone: BackboneConfig, cfg: MAESection) -> None:
        super().__init__()
        net = backbone.build()
        if not isinstance(getattr(net, "cfg", None), ViTConfig) or getattr(net, "pos_embed", None) is None:
            raise ValueError(f"mae: backbone {backbone.name!r} must be a ViT with learned position embeddings")
        net.mask_token.requires_grad_(False)  # DINOv2's mask token: MAE's encoder never sees masked patches
        self.backbone = net
        self.decoder = MAEDecoder(net.embed_dim, cfg, net.patch_size, net.cfg.in_chans, net.cfg.attn_backend)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


# ------------------------------------------------------------------------------------------------ the method
@register_method
class MAEMethod(Method):
    """MAE (see the module docstring)."""

    name = "mae"
    config_class = MAEConfig
    cfg: MAEConfig
    arch: MAEArch

    def build(self) -> MAEArch:
        return MAEArch(self.cfg.backbone, self.cfg.mae)

    def parts(self) -> list[Part]:
        return [Part("encoder", self.arch.backbone, "trained", forward_methods=("forward_features_visible",)),
                Part("decoder", self.arch.decoder, "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0), patch_size=self.arch.backbone.patch_size)

    def param_groups(self) -> list[dict[str, Any]]:
        """Two groups: weight decay on matrices; none on biases, norms, LayerScale, positions and tokens."""
        return vit_decay_groups(self.arch)

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.arch.backbone, "decoder": self.arch.decoder}

    def reconstruct(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Masks, encoder output and predictions of this rank's ``images`` at ``step``."""
        net, p = self.arch.backbone, self.arch.backbone.patch_size
        b, _, h, w = images.shape
        grid = (h // p, w // p)
        keep, restore, mask = random_masking(self.cfg.seed, step, rank() * b, b, grid[0] * grid[1],
                                             self.cfg.mae.mask_ratio, images.device)
        out = net.forward_features_visible(images, keep)
        latent = torch.cat((out["x_norm_clstoken"].unsqueeze(1), out["x_norm_regtokens"], out["x_norm_patchtokens"]),
                           dim=1)
        pred = self.arch.decoder(latent, restore, grid, 1 + net.num_register_tokens)
        return {"keep": keep, "restore": restore, "mask": mask, "latent": latent, "pred": pred}

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        crops = batch["global_crops"]  # crop-major: every image's first crop, then every second crop
        images = crops[: len(crops) // 2]
        res = self.reconstruct(images, int(self.arch.steps))
        target = patchify(images, self.arch.backbone.patch_size)
        norm_pix = self.cfg.mae.norm_pix_loss
        loss = mae_loss(res["pred"], target, res["mask"], norm_pix=norm_pix)
        with torch.no_grad():
            visible = mae_loss(res["pred"].detach(), target, 1 - res["mask"], norm_pix=norm_pix)
        return loss, {"losses": {"mae": loss.detach(), "total": loss.detach()},
                      "extras": {"loss_visible": visible, "mask_fraction": res["mask"].mean()}}

    def after_step(self, values: ScheduleValues) -> None:
        """Advance the step counter that keys the masks."""
        super().after_step(values)
        self.arch.steps.add_(1)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Reconstruction error on the masked (the loss) and on the visible patches, and the masked fraction."""
        e = out["extras"]
        return {"loss_masked": float(out["losses"]["mae"]), "loss_visible": float(e["loss_visible"]),
                "mask_fraction": float(e["mask_fraction"])}

    def flops_per_sample(self, batch: dict[str, Any]) -> float | None:
        """Forward + backward (3x forward) of the encoder on the visible tokens and of the decoder on all tokens."""
        c, s = self.arch.backbone.cfg, self.cfg.mae
        g = batch["global_crops"]
        n = (g.shape[-2] // c.patch_size) * (g.shape[-1] // c.patch_size)
        prefix = 1 + c.num_register_tokens
        visible = n - round(n * s.mask_ratio)
        enc = vit_forward_flops(c.embed_dim, c.depth, int(c.embed_dim * c.mlp_ratio), prefix + visible,
                                c.ffn == "swiglu")
        dec = vit_forward_flops(s.decoder_dim, s.decoder_depth, int(s.decoder_dim * s.decoder_mlp_ratio), prefix + n)
        return 3 * (enc + dec + 2 * n * s.decoder_dim * c.patch_size**2 * c.in_chans)

    def export(self, out: Path, *, is_main: bool) -> None:
        """``backbone.pth`` (+ sidecar) and ``decoder.pth`` (the decoder's state dict)."""
        sd = full_state_dict(self.arch)  # collective: every rank
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        export_backbone_with_config(sd, out / "backbone.pth", name=self.cfg.backbone.name, backbone=self.arch.backbone,
                                    extra={"method": "mae", "mae": dataclasses.asdict(self.cfg.mae)})
        torch.save({k.removeprefix("decoder."): v.cpu() for k, v in sd.items() if k.startswith("decoder.")},
                   out / "decoder.pth")
        logger.info("exported backbone.pth and decoder.pth to %s", out)

    def summary(self) -> str:
        s = self.cfg.mae
        n = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in self.arch.named_children()}
        return (f"MAE: {self.cfg.backbone.name} encoder {n['backbone']:.2f}M + decoder {s.decoder_depth} x "
                f"{s.decoder_dim} ({n['decoder']:.2f}M), mask ratio {s.mask_ratio}, norm_pix_loss {s.norm_pix_loss}")
