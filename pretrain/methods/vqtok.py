"""``method = "vqtok"``: a small convolutional VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete
Representation Learning") trained on the pretraining shards as the discrete visual tokenizer of ``method = "beit"``.

- View: both global crops of every image (random resized crop and flip; the recipe sets no colour augmentation),
  ImageNet-normalised as the loader gives them; the reconstruction target is that normalised image.
- Encoder: a 3x3 conv stem, then down to one position per ViT patch: ``log2(patch_size)`` stride-2 4x4 convs when
  ``patch_size`` is a power of two, else one ``patch_size`` x ``patch_size`` conv of that stride; then
  ``res_blocks`` residual blocks (ReLU, 3x3, ReLU, 1x1) and a 1x1 conv to ``code_dim``. One code per patch, in the
  ViT's raster order. The decoder mirrors it (transposed convs up to the pixels).
- Quantiser: nearest of ``codebook_size`` codes in L2, straight-through gradient to the encoder. The codebook is a
  buffer updated by exponential moving averages of the assigned counts and sums (VQ-VAE appendix A.1, decay
  ``vqtok.decay``), summed over all ranks, after the optimizer step. At the first step it is initialised from
  encoder outputs of the batch (``vqtok.data_init``); codes whose average count falls below
  ``vqtok.dead_threshold`` are restarted at encoder outputs of the batch (dead-code restart). The candidates are
  a few distinct patches per crop drawn from a generator seeded by (seed, step, global image index), so the update
  does not depend on the split over ranks.
- Loss: ``mse(reconstruction, image) + beta * mse(z_e, sg[e])`` (the commitment term as a mean over elements; the
  codebook term of the paper is replaced by the EMA update). fp32.
- Metrics: ``recon`` and ``commit`` every step; codebook perplexity, codes used in the batch and dead codes as
  monitors.
- Export: ``tokenizer.pth``: ``{"method", "config" (the vqtok section), "img_size", "state_dict"}``, loaded by
  :func:`load_tokenizer` (BEiT's frozen tokenizer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import full_state_dict
from pretrain.config import DataConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.methods.base import LossOutput, Method, Part, Views, register_method
from pretrain.optim import ScheduleValues
from pretrain.utils.dist import all_reduce_sum_, gather_batch, rank

__all__ = ["VQTokArch", "VQTokConfig", "VQTokMethod", "VQTokSection", "VQTokenizer", "code_perplexity",
           "load_tokenizer", "nearest_codes"]

logger = logging.getLogger("pretrain")

#: candidate patches per crop of every image for the data init and the dead-code restarts
CANDIDATES_PER_CROP = 4


@dataclasses.dataclass(kw_only=True)
class VQTokSection:
    """VQ-VAE tokenizer settings (defaults: the full-scale BEiT tokenizer, one code per 16 px patch)."""

    patch_size: int = 16
    """Pixels per code along a side (the BEiT ViT's patch size, so there is one code per patch)."""
    codebook_size: int = 8192
    """K codes (8192: the DALL-E tokenizer's vocabulary that BEiT uses)."""
    code_dim: int = 32
    """Width of a code."""
    hidden_dim: int = 128
    """Channels of the convolutions."""
    res_blocks: int = 2
    """Residual blocks at the code grid in the encoder and in the decoder."""
    in_chans: int = 3
    """Image channels."""
    beta: float = 0.25
    """Commitment weight."""
    decay: float = 0.99
    """EMA decay of the codebook's counts and sums."""
    dead_threshold: float = 0.1
    """Codes whose EMA count (assignments per global step) falls below this restart at a batch vector; 0 = never.
    A restarted code's count is reset to 1."""
    data_init: bool = True
    """Initialise the codebook from encoder outputs at the first step."""

    def __post_init__(self) -> None:
        for name in ("patch_size", "codebook_size", "code_dim", "hidden_dim", "in_chans"):
            if getattr(self, name) < 1:
                raise ValueError(f"vqtok.{name} must be >= 1, got {getattr(self, name)}")
        if self.res_blocks < 0:
            raise ValueError(f"vqtok.res_blocks must be >= 0, got {self.res_blocks}")
        if self.beta < 0:
            raise ValueError(f"vqtok.beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"vqtok.decay must be in [0, 1), got {self.decay}")
        if not 0.0 <= self.dead_threshold < 1.0:
            raise ValueError(f"vqtok.dead_threshold must be in [0, 1) (a restarted code's count is 1), got "
                             f"{self.dead_threshold}")


@dataclasses.dataclass(kw_only=True)
class VQTokConfig(TrainConfig):
    """A tokenizer run: the shared sections plus ``vqtok``."""

    name: str = "vqtok"
    """Run name (logs)."""
    method: str = "vqtok"
    """The training method (this class: 'vqtok')."""
    vqtok: VQTokSection = dataclasses.field(default_factory=VQTokSection)
    """Network, codebook and loss."""
    data: DataConfig
    """Shards and crops (both global crops are trained on)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        size, p = self.data.crops.global_size, self.vqtok.patch_size
        if size % p:
            raise ValueError(f"vqtok.patch_size ({p}) must divide data.crops.global_size ({size})")


# ------------------------------------------------------------------------------------------------ functions
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest code (L2) of every row of ``z`` ``(M, d)`` in ``codebook`` ``(K, d)``; fp32, ``chunk``
    rows at a time (the distance matrix of a full-scale batch against 8192 codes would be ~1 GB)."""
    z, e = z.float(), codebook.float()
    e2 = e.square().sum(1)[None]
    return torch.cat([(part.square().sum(1, keepdim=True) - 2 * part @ e.t() + e2).argmin(1)
                      for part in z.split(chunk)]) if len(z) else torch.zeros(0, dtype=torch.long, device=z.device)


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of the code distribution ``counts / counts.sum()`` (1: one code, K: uniform)."""
    p = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


def _sample_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------ modules
class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _resampling(c: int, p: int, up: bool) -> list[nn.Module]:
    conv = nn.ConvTranspose2d if up else nn.Conv2d
    if p & (p - 1) == 0:  # a power of two: stride-2 steps
        return [m for _ in range(int(math.log2(p))) for m in (nn.ReLU(), conv(c, c, 4, stride=2, padding=1))]
    return [nn.ReLU(), conv(c, c, p, stride=p)]


class VQTokenizer(nn.Module):
    """The VQ-VAE (see the module docstring): ``encoder``, ``decoder`` and the EMA codebook buffers."""

    codebook: torch.Tensor
    ema_count: torch.Tensor
    ema_sum: torch.Tensor

    def __init__(self, cfg: VQTokSection) -> None:
        super().__init__()
        self.cfg = cfg
        h, p = cfg.hidden_dim, cfg.patch_size
        self.patch_size = p
        self.encoder = nn.Sequential(nn.Conv2d(cfg.in_chans, h, 3, padding=1), *_resampling(h, p, up=False),
                                     *(_Res(h) for _ in range(cfg.res_blocks)), nn.ReLU(),
                                     nn.Conv2d(h, cfg.code_dim, 1))
        self.decoder = nn.Sequential(nn.Conv2d(cfg.code_dim, h, 1), *(_Res(h) for _ in range(cfg.res_blocks)),
                                     *_resampling(h, p, up=True), nn.ReLU(), nn.Conv2d(h, cfg.in_chans, 3, padding=1))
        codebook = torch.randn(cfg.codebook_size, cfg.code_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(cfg.codebook_size))
        self.register_buffer("ema_sum", codebook.clone())

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """Code grid of an ``h`` x ``w`` image."""
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image sides {h}x{w} must be multiples of the tokenizer's patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def forward(self, images: torch.Tensor, decode: bool = True) -> dict[str, torch.Tensor | None]:
        """``codes`` ``(B, N)`` (raster order), encoder output ``z`` and its codes ``q`` ``(B, N, d)`` and, with
        ``decode``, the reconstruction ``recon`` of the straight-through quantised grid."""
        gh, gw = self.grid(images.shape[-2], images.shape[-1])
        z = self.encoder(images).float()
        b, d = z.shape[:2]
        z = z.permute(0, 2, 3, 1).reshape(b, gh * gw, d)
        codes = nearest_codes(z.reshape(-1, d).detach(), self.codebook).view(b, gh * gw)
        q = self.codebook[codes]
        recon = None
        if decode:
            st = (z + (q - z).detach()).reshape(b, gh, gw, d).permute(0, 3, 1, 2)
            recon = self.decoder(st)
        return {"codes": codes, "z": z, "q": q, "recon": recon}


def load_tokenizer(path: str | Path, field: str = "beit.tokenizer") -> tuple[VQTokenizer, dict[str, Any]]:
    """A vqtok export (its ``export`` folder or ``tokenizer.pth``) as ``(tokenizer in eval mode, export dict)``;
    ValueError naming ``field`` when it is missing or not a vqtok export."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.pth"
    if not str(path) or not p.is_file():
        raise ValueError(f"{field}: no tokenizer export at {str(path)!r} (a vqtok run's export folder or its "
                         "tokenizer.pth; train one with `python -m pretrain train pretrain/recipes/vqtok_*.toml`)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one with objects beyond tensors and plain types
        raise ValueError(f"{field}: {p} is not a vqtok tokenizer export ({type(exc).__name__})") from exc
    if not isinstance(blob, dict) or blob.get("method") != "vqtok" or "state_dict" not in blob:
        raise ValueError(f"{field}: {p} is not a vqtok tokenizer export")
    try:
        tok = VQTokenizer(VQTokSection(**blob["config"]))
        tok.load_state_dict(blob["state_dict"])
    except (TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{field}: {p} does not load as a vqtok tokenizer: {exc}") from exc
    return tok.eval(), blob


class VQTokArch(nn.Module):
    """``tokenizer`` and the step counter that seeds the codebook's candidates."""

    steps: torch.Tensor

    def __init__(self, cfg: VQTokSection) -> None:
        super().__init__()
        self.tokenizer = VQTokenizer(cfg)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


# ------------------------------------------------------------------------------------------------ the method
@register_method
class VQTokMethod(Method):
    """The VQ-VAE tokenizer (see the module docstring)."""

    name = "vqtok"
    config_class = VQTokConfig
    cfg: VQTokConfig
    arch: VQTokArch

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self._pending: dict[str, torch.Tensor] | None = None

    def build(self) -> VQTokArch:
        return VQTokArch(self.cfg.vqtok)

    def parts(self) -> list[Part]:
        return [Part("tokenizer", self.arch.tokenizer, "trained")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0), patch_size=self.cfg.vqtok.patch_size)

    def param_groups(self) -> list[dict[str, Any]]:
        """Two groups: weight decay on conv kernels, none on biases."""
        params = [p for p in self.arch.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim > 1], "lr_multiplier": 1.0, "wd_multiplier": 1.0,
                 "is_last_layer": False},
                {"params": [p for p in params if p.ndim <= 1], "lr_multiplier": 1.0, "wd_multiplier": 0.0,
                 "is_last_layer": False}]

    def clip_modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.arch.tokenizer}

    def _candidates(self, z: torch.Tensor, n_crops: int, step: int) -> torch.Tensor:
        """``(B, n_crops * c, d)``: c seeded patches of every crop of every image of this rank (image-major)."""
        b, n, d = z.shape[0] // n_crops, z.shape[1], z.shape[2]
        per_img = z.view(n_crops, b, n, d)
        rows = []
        for i in range(b):
            g = torch.Generator().manual_seed(_sample_seed(self.cfg.seed, step, rank() * b + i))
            idx = (torch.stack([torch.randperm(n, generator=g)[:CANDIDATES_PER_CROP] for _ in range(n_crops)])
                   if n >= CANDIDATES_PER_CROP else torch.randint(n, (n_crops, CANDIDATES_PER_CROP), generator=g))
            idx = idx.to(z.device)
            rows.append(torch.cat([per_img[c, i][idx[c]] for c in range(n_crops)]))
        return torch.stack(rows)

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        crops = batch["global_crops"]  # crop-major: every image's first crop, then every second crop
        tok = self.arch.tokenizer
        res = tok(crops)
        z, q, codes = res["z"], res["q"], res["codes"]
        recon = F.mse_loss(res["recon"].float(), crops.float())
        commit = F.mse_loss(z, q.detach())
        loss = recon + self.cfg.vqtok.beta * commit
        with torch.no_grad():
            k = self.cfg.vqtok.codebook_size
            flat = z.detach().reshape(-1, z.shape[-1])
            counts = torch.bincount(codes.flatten(), minlength=k).float()
            sums = torch.zeros(k, z.shape[-1], device=z.device).index_add_(0, codes.flatten(), flat)
            self._pending = {"counts": counts, "sums": sums,
                             "candidates": self._candidates(z.detach(), 2, int(self.arch.steps))}
        return loss, {"losses": {"recon": recon.detach(), "commit": commit.detach(), "total": loss.detach()},
                      "extras": {"counts": counts}}

    @torch.no_grad()
    def after_step(self, values: ScheduleValues) -> None:
        """The codebook's EMA update (counts and sums summed over ranks), data init at step 0, dead-code restarts;
        then the step counter advances."""
        super().after_step(values)
        pending, self._pending = self._pending, None
        tok, s = self.arch.tokenizer, self.cfg.vqtok
        step = int(self.arch.steps)
        if pending is not None:
            counts, sums = all_reduce_sum_(pending["counts"]), all_reduce_sum_(pending["sums"])
            cands = gather_batch(pending["candidates"]).flatten(0, 1)  # global image order on any split
            g = torch.Generator().manual_seed(_sample_seed(self.cfg.seed, step, -1))
            k = s.codebook_size
            if step == 0 and s.data_init:
                idx = (torch.randperm(len(cands), generator=g)[:k] if len(cands) >= k
                       else torch.randint(len(cands), (k,), generator=g))
                tok.codebook.copy_(cands[idx.to(cands.device)])
                tok.ema_count.fill_(1.0)
                tok.ema_sum.copy_(tok.codebook)
            else:
                tok.ema_count.mul_(s.decay).add_(counts, alpha=1 - s.decay)
                tok.ema_sum.mul_(s.decay).add_(sums, alpha=1 - s.decay)
                tok.codebook.copy_(tok.ema_sum / tok.ema_count.clamp_min(1e-12)[:, None])
                dead = (tok.ema_count < s.dead_threshold).nonzero().flatten()
                if len(dead):
                    idx = torch.randint(len(cands), (len(dead),), generator=g).to(cands.device)
                    tok.codebook[dead] = cands[idx]
                    tok.ema_count[dead] = 1.0
                    tok.ema_sum[dead] = cands[idx]
        self.arch.steps.add_(1)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Codebook perplexity and codes used in this rank's batch, dead codes of the EMA (below the threshold)."""
        counts = out["extras"]["counts"]
        tok = self.arch.tokenizer
        return {"perplexity": float(code_perplexity(counts)), "codes_used": float((counts > 0).sum()),
                "dead_codes": float((tok.ema_count < self.cfg.vqtok.dead_threshold).sum())}

    def export(self, out: Path, *, is_main: bool) -> None:
        """``tokenizer.pth`` (see :func:`load_tokenizer`)."""
        sd = full_state_dict(self.arch)  # collective: every rank
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        state = {k.removeprefix("tokenizer."): v.cpu() for k, v in sd.items() if k.startswith("tokenizer.")}
        torch.save({"method": "vqtok", "config": dataclasses.asdict(self.cfg.vqtok),
                    "img_size": self.cfg.data.crops.global_size, "state_dict": state}, out / "tokenizer.pth")
        logger.info("exported tokenizer.pth to %s", out)

    def summary(self) -> str:
        s = self.cfg.vqtok
        n = sum(p.numel() for p in self.arch.parameters()) / 1e6
        return (f"VQ tokenizer: {n:.2f}M params, patch {s.patch_size}, {s.codebook_size} codes x {s.code_dim}, "
                f"beta {s.beta}, EMA decay {s.decay}")
