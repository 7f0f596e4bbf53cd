"""Built-in weight-free copy-detection descriptor (no download, CPU-cheap).

The picture is reduced to luminance (so grayscale copies match colour originals) and resized to 128x128 (so
rescaled and mildly cropped copies line up). Two branches, the luminance itself (global layout) and its local
contrast normalisation (sigma 8 px: structure independent of lighting), are each described at two grids
(16x16 and 32x32, each Gaussian-blurred to tolerate the shift a <=10% crop causes) by their intensity and
gradient-magnitude maps. Each map is split into its left-right symmetric part and the absolute value of its
antisymmetric part, which are both unchanged by a
horizontal flip; each block is mean-centred (brightness invariance) and L2-normalised (contrast invariance),
then the blocks are concatenated, each branch L2-normalised and the two halves joined (5120 dims). Cosine
similarity is a correlation of flip-invariant structure. On the copy-detection test set (skimage and mate photos
with JPEG q>=30, >=50% rescale, <=10% crops, flips, +-20% brightness/contrast, grayscale) the copy-detection
components have precision 1.0 and recall >= 0.93 for any threshold in 0.40..0.55; ``recipes/default.toml``
uses 0.48 (and 0.42 for decontamination), not DINOv2's SSCD values. Textures with no large-scale
layout (gravel, grass) under cropping are its weak spot; use SSCD (TorchScript) for web-scale dedup.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["DescriptorPreprocess", "descriptor_dim", "gaussian_blur"]

_SIZE = 128
_GRIDS = ((16, 1.0), (32, 2.0))
_LCN_SIGMA = 8.0


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array with reflected borders."""
    r = max(1, int(3 * sigma + 0.5))
    t = np.arange(-r, r + 1, dtype=np.float32)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    p = np.pad(x, r, mode="reflect")
    # rows then columns, each as a sum of shifted copies (fast for small kernels)
    rows = sum(k[i] * p[i : i + x.shape[0] + 0, :] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, i : i + x.shape[1]] for i in range(2 * r + 1))


def _unit(v: np.ndarray) -> np.ndarray:
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-12 else v


def _flip_parts(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = m.shape[1] // 2
    f = m[:, ::-1]
    return ((m + f) * 0.5)[:, :half], np.abs(m - f)[:, :half] * 0.5


def descriptor_dim() -> int:
    """Length of the descriptor."""
    return 2 * sum(4 * n * (n // 2) for n, _ in _GRIDS)


def _local_contrast(g: np.ndarray, sigma: float) -> np.ndarray:
    """Local contrast normalisation: subtract the local mean, divide by the local standard deviation."""
    m = gaussian_blur(g, sigma)
    sd = np.sqrt(np.maximum(gaussian_blur((g - m) ** 2, sigma), 0.0)) + 0.03
    return (g - m) / sd


def _branch(g: np.ndarray) -> list[np.ndarray]:
    parts = []
    for n, sigma in _GRIDS:
        t = np.asarray(Image.fromarray(g).resize((n, n), Image.BOX), dtype=np.float32)
        t = gaussian_blur(t, sigma)
        gy, gx = np.gradient(t)
        for m in (t, np.hypot(gx, gy)):
            sym, anti = _flip_parts(m)
            parts += [_unit(sym.ravel()), _unit(anti.ravel())]
    return parts


class DescriptorPreprocess:
    """PIL RGB image -> descriptor (float32, L2-normalised). Picklable; used inside decode workers."""

    draft_size = (_SIZE, _SIZE)

    def __call__(self, img: Image.Image) -> np.ndarray:
        gray = img.convert("L").resize((_SIZE, _SIZE), Image.BILINEAR, reducing_gap=2.0)
        g = np.asarray(gray, dtype=np.float32) / 255.0
        raw = np.concatenate(_branch(g))
        lcn = np.concatenate(_branch(_local_contrast(g, _LCN_SIGMA).astype(np.float32)))
        v = np.concatenate([raw / np.linalg.norm(raw), lcn / np.linalg.norm(lcn)]).astype(np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-12)


class DescriptorEmbedder:
    """Embedder interface around :class:`DescriptorPreprocess` (all work happens in preprocessing)."""

    def __init__(self) -> None:
        self.preprocess = DescriptorPreprocess()
        self.dim = descriptor_dim()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        return batch / np.maximum(np.linalg.norm(batch, axis=1, keepdims=True), 1e-12)
