"""Raw pixels as a curation embedder: the baseline every learned embedder has to beat.

Use it as a plugin (no weights, CPU-cheap)::

    [embed]
    model = "plugin"
    factory = "curation.models.pixels:pixel_embedder"
    image_size = 28          # the side the pixels are taken at: dim = image_size ** 2
    resize = "square"        # or "short_side_crop"

The image is converted to luminance (``L``), resized to ``image_size`` x ``image_size`` (``square``: the whole
image squeezed to a square; ``short_side_crop``: short side to ``image_size`` then centre crop; bilinear, a
no-op for items already at that size), read as ``pixels / 255`` in [0, 1], flattened row-major and L2-normalised.
Cosine similarity is then the normalised correlation of the raw intensities, which is what the classic
"k-NN on raw pixels" baseline for Fashion-MNIST / MNIST uses (about 85% k-NN top-1 on Fashion-MNIST).

Choices, and why:

* luminance, not RGB: one vector per image whatever its mode (Fashion-MNIST PNGs are grayscale, photos and copies
  may be RGB or grayscale), and for a gray picture RGB would only repeat every value three times (same cosine);
* no per-image mean-centring or contrast normalisation: that is a descriptor (``curation.models.descriptor``
  already does it, with flip invariance and gradients), not pixels; the point of this embedder is the plain
  baseline, so a background-heavy item is compared by where its ink is, nothing more;
* the vector is produced in ``preprocess`` (decode workers, like the built-in descriptor), so no model runs and
  an all-black image (norm 0) stays a zero vector.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

__all__ = ["PixelEmbedder", "PixelPreprocess", "pixel_embedder"]

_MAX_SIDE = 256  # 65536 dims: beyond that pixels are no sensible embedding (and float16 storage grows fast)


class PixelPreprocess:
    """PIL image -> float32 ``(size * size,)``: luminance / 255, L2-normalised. Picklable (decode workers)."""

    def __init__(self, size: int, mode: str = "square") -> None:
        if mode not in ("square", "short_side_crop"):
            raise ValueError(f"embed.resize must be square or short_side_crop, got {mode!r}")
        if not 1 <= size <= _MAX_SIDE:
            raise ValueError(f"pixel embedder: embed.image_size must be in 1..{_MAX_SIDE}, got {size}")
        self.size = size
        self.mode = mode
        self.draft_size = (size, size)

    def __call__(self, img: Image.Image) -> np.ndarray:
        s = self.size
        g = img.convert("L")
        if g.size != (s, s):
            if self.mode == "square":
                g = g.resize((s, s), Image.BILINEAR, reducing_gap=2.0)
            else:
                w, h = g.size
                scale = s / min(w, h)
                nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
                g = g.resize((nw, nh), Image.BILINEAR, reducing_gap=2.0)
                left, top = (nw - s) // 2, (nh - s) // 2
                g = g.crop((left, top, left + s, top + s))
        v = np.asarray(g, dtype=np.float32).ravel() / 255.0
        return v / max(float(np.linalg.norm(v)), 1e-12)


class PixelEmbedder:
    """Embedder interface around :class:`PixelPreprocess` (all work happens in preprocessing)."""

    def __init__(self, size: int, mode: str = "square") -> None:
        self.preprocess = PixelPreprocess(size, mode)
        self.dim = size * size

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        return batch / np.maximum(np.linalg.norm(batch, axis=1, keepdims=True), 1e-12)


def pixel_embedder(cfg: Any, device: str | None = None) -> PixelEmbedder:
    """Plugin factory (``embed.factory = "curation.models.pixels:pixel_embedder"``): pixels at ``embed.image_size``
    with ``embed.resize``; ``device`` is ignored (no model runs)."""
    return PixelEmbedder(int(cfg.image_size), str(cfg.resize))
