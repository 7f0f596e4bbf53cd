"""Neural embedders: ``pretrain.models`` backbones and TorchScript files, with per-model preprocessing.

Preprocessing runs on CPU workers and yields uint8 HWC arrays (small to ship between processes); normalisation,
bf16 autocast (on CUDA) and the L2 normalisation of the output happen in :meth:`TorchEmbedder.embed`.
"""

from __future__ import annotations

import io
import logging
import warnings

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["ResizePreprocess", "TorchEmbedder", "load_torchscript"]

log = logging.getLogger(__name__)


class ResizePreprocess:
    """PIL RGB -> uint8 ``(size, size, 3)``: short-side resize + centre crop, or a fixed (skewed) square."""

    def __init__(self, size: int, mode: str) -> None:
        if mode not in ("short_side_crop", "square"):
            raise ValueError(f"embed.resize must be short_side_crop or square, got {mode!r}")
        self.size = size
        self.mode = mode
        self.draft_size = (size, size)

    def __call__(self, img: Image.Image) -> np.ndarray:
        s = self.size
        if self.mode == "square":
            out = img.resize((s, s), Image.BICUBIC, reducing_gap=3.0)
        else:
            w, h = img.size
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            out = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
            left, top = (nw - s) // 2, (nh - s) // 2
            out = out.crop((left, top, left + s, top + s))
        return np.asarray(out.convert("RGB"), dtype=np.uint8)


def load_torchscript(url: str) -> torch.jit.ScriptModule:
    """Load a TorchScript file from a local path or any fsspec URL onto the CPU."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is how SSCD and others ship
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu")


class TorchEmbedder:
    """Runs a module on batches of preprocessed uint8 images; returns L2-normalised float32 embeddings.

    The module may return a tensor, a tuple (first item used) or a ``pretrain.models`` feature dict
    (``x_norm_clstoken`` used).
    """

    def __init__(
        self, model: torch.nn.Module, preprocess: ResizePreprocess, mean: list[float], std: list[float], device: str
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.preprocess = preprocess
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        with torch.inference_mode():
            probe = np.zeros((1, preprocess.size, preprocess.size, 3), dtype=np.uint8)
            self.dim = int(self._forward(probe).shape[1])
        log.info("embedder ready on %s: dim=%d, input %dpx (%s)", device, self.dim, preprocess.size, preprocess.mode)

    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        x = (x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(x)
        if isinstance(out, dict):
            out = out["x_norm_clstoken"]
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim != 2:
            raise ValueError(f"embedding model must return (batch, dim) features, got shape {tuple(out.shape)}")
        return F.normalize(out.float(), dim=1)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._forward(batch).cpu().numpy()
