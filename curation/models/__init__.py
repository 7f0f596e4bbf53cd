"""Embedding models for the embed stage: ``build_embedder(cfg)`` returns an object with ``preprocess`` (PIL RGB
-> array, picklable, runs in decode workers), ``embed(batch) -> (n, dim)`` L2-normalised float32, and ``dim``.

Kinds: ``descriptor`` (built-in, weight-free), ``backbone`` (``pretrain.models.build_backbone`` name + weights
path/URL, official DINOv2 or dinoforge exports; ``name = "auto"`` reads the architecture from the export's
``<weights>.json`` sidecar, ``image_size = 0`` embeds at the backbone's own input size, e.g. 28 px for a
Fashion-MNIST ``teacher.pth``), ``torchscript`` (e.g. the SSCD descriptor) and ``plugin``
(``package.module:function(cfg, device)`` returning such an object; ``curation.models.pixels:pixel_embedder``
is the raw-pixel baseline).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from curation.config import EmbedConfig

__all__ = ["build_embedder", "resolve_device"]

log = logging.getLogger(__name__)


def resolve_device(cfg: EmbedConfig) -> str:
    """``cuda`` when asked for or (``auto``) when this worker sees a GPU, else ``cpu``."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError('embed.device = "cuda" but this worker sees no CUDA device; use "auto" or "cpu"')
    if cfg.device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_embedder(cfg: EmbedConfig, device: str | None = None) -> Any:
    """Build the embedder named by ``cfg.model`` on ``device`` (default: :func:`resolve_device`)."""
    if cfg.model == "descriptor":
        from curation.models.descriptor import DescriptorEmbedder

        return DescriptorEmbedder()
    device = device or resolve_device(cfg)
    if cfg.model == "plugin":
        module, _, fn = cfg.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"embed.factory {cfg.factory!r} cannot be imported: {exc}") from None
        return factory(cfg, device)
    from curation.models.torch_embedder import ResizePreprocess, TorchEmbedder, load_torchscript

    size = cfg.image_size
    if cfg.model == "torchscript":
        if not size:
            raise ValueError('embed.image_size = 0 (the model\'s own size) needs embed.model = "backbone"')
        model = load_torchscript(cfg.weights)
    else:
        from pretrain.models import build_backbone

        name = None if cfg.name == "auto" else cfg.name
        if name is None and not cfg.weights:
            raise ValueError('embed.name = "auto" reads the architecture from the <weights>.json sidecar: set '
                             "embed.weights to an export")  # fmt: skip
        model = build_backbone(name, weights=cfg.weights or None)
        if not cfg.weights:
            log.warning("embed.weights is empty: backbone %s has random weights", cfg.name)
        patch = getattr(model, "patch_size", 1)
        size = size or int(getattr(getattr(model, "cfg", None), "img_size", 0) or 224)
        if size % patch:
            raise ValueError(f"embed.image_size={size} must be a multiple of the patch size {patch}")
    return TorchEmbedder(model, ResizePreprocess(size, cfg.resize), cfg.mean, cfg.std, device)
