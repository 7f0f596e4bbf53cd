"""Backbone registry, strict loading of official DINOv2 / dinoforge checkpoints, and export in the official layout."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from torch import nn

from .vit import DinoVisionTransformer, ViTConfig

logger = logging.getLogger(__name__)

#: Architectures by name. ``<name>_reg4`` adds 4 register tokens and the exact-size antialiased interpolation.
ARCHS: dict[str, dict[str, Any]] = {
    "vits14": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vitb14": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vitl14": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vitg14": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn": "swiglu"},
    # Small sizes for tests, CPU demos and distillation students on CPU.
    "vit_test": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 56},
    "vit_tiny": {"embed_dim": 192, "depth": 6, "num_heads": 3, "img_size": 112},
    "vit_mini": {"embed_dim": 96, "depth": 4, "num_heads": 3, "img_size": 112},
}
_REG = re.compile(r"^(?P<base>.+)_reg(?P<n>\d+)$")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def backbone_names() -> list[str]:
    """All buildable names: each architecture and its ``_reg4`` variant."""
    return [n for a in ARCHS for n in (a, f"{a}_reg4")]


def backbone_config(name: str, **overrides: Any) -> ViTConfig:
    """The ``ViTConfig`` for ``name`` (e.g. ``vitl14``, ``vitg14_reg4``, ``vit_test``) with field overrides."""
    match = _REG.match(name)
    base = match["base"] if match else name
    if base not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(backbone_names())}")
    kwargs: dict[str, Any] = dict(ARCHS[base])
    if match:
        kwargs.update(num_register_tokens=int(match["n"]), interpolate_offset=0.0, interpolate_antialias=True)
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown backbone override(s) {unknown}; known: {sorted(known)}")
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def _read_checkpoint(path: str) -> Mapping[str, Any]:
    """``torch.load(weights_only=True)`` from a local path (memory-mapped) or any fsspec URL."""
    protocol = fsspec.utils.get_protocol(path)
    if protocol in ("file", "local"):
        local = fsspec.core.strip_protocol(path)
        try:
            return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(local, map_location="cpu", weights_only=True)
    with fsspec.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def normalize_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap common containers and key prefixes to the official backbone layout.

    Handles plain official files, DINOv2 ``teacher_checkpoint.pth`` (``{"teacher": {"backbone.*": ...}}``, chunked
    ``blocks.<chunk>.<i>.*`` keys) and ``module.`` prefixes.
    """
    for wrapper in ("teacher", "model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in sd.items()}


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped keys (strict loading)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped keys ({len(shapes)}): {'; '.join(shapes)}")
        raise ValueError("checkpoint does not match the backbone:\n  " + "\n  ".join(parts))


def build_backbone(name: str | None, weights: str | None = None, **overrides: Any) -> DinoVisionTransformer:
    """Build a backbone by name, optionally loading weights strictly.

    Args:
        name: an entry of ``backbone_names()``; ``None`` reads the architecture from the ``<weights>.json`` sidecar
            that ``export_backbone`` writes.
        weights: local path or fsspec URL of an official DINOv2 backbone checkpoint (e.g.
            ``dinov2_vitg14_reg4_pretrain.pth``) or a dinoforge export. The stored position-embedding grid sets
            ``img_size`` unless it is overridden.
        overrides: ``ViTConfig`` fields (``drop_path_rate``, ``attn_backend``, ``img_size``, ...).
    """
    sidecar: dict[str, Any] = {}
    if weights is not None:
        try:
            with fsspec.open(weights + ".json", "r") as f:
                sidecar = json.load(f)
        except FileNotFoundError:
            sidecar = {}
    if name is None:
        if "config" not in sidecar:
            raise ValueError("build_backbone(None, weights=...) needs the <weights>.json sidecar of export_backbone")
        name = sidecar.get("name") or "vit_test"  # every architecture field is in the sidecar config
        overrides = {**sidecar["config"], **overrides}
    if weights is None:
        return DinoVisionTransformer(backbone_config(name, **overrides))

    sd = normalize_state_dict(_read_checkpoint(weights))
    if "img_size" not in overrides and "pos_embed" in sd:
        patch = overrides.get("patch_size", backbone_config(name).patch_size)
        grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
        overrides = {**overrides, "img_size": grid * patch}
    cfg = backbone_config(name, **overrides)
    with torch.device("meta"):
        model = DinoVisionTransformer(cfg)
    check_state_dict(model, sd)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    logger.info("loaded %s weights from %s", name, weights)
    return model


def export_backbone(model: nn.Module | Mapping[str, torch.Tensor], path: str, *, name: str | None = None,
                    prefix: str = "") -> None:
    """Write a backbone in the official DINOv2 key layout (no chunk indices), loadable by official code.

    Args:
        model: a ``DinoVisionTransformer`` or a full state dict (e.g. gathered from FSDP).
        path: local path or fsspec URL of the ``.pth`` file; a ``<path>.json`` sidecar records the architecture.
        name: architecture name for the sidecar (required when ``model`` is a state dict).
        prefix: keep only keys under this prefix and strip it (e.g. ``"backbone."`` from a student state dict).
    """
    cfg = getattr(model, "cfg", None)
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = normalize_state_dict(sd)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())
    meta: dict[str, Any] = {"format": "dinov2-backbone", "name": name}
    if cfg is not None:
        meta["config"] = dataclasses.asdict(cfg)
        meta["config"].pop("attn_backend", None)
        if name is None:
            meta["name"] = _guess_name(cfg)
    with fsspec.open(path + ".json", "w") as f:
        json.dump(meta, f, indent=2)


def _guess_name(cfg: ViTConfig) -> str | None:
    for base, arch in ARCHS.items():
        if all(getattr(cfg, k) == v for k, v in arch.items() if k not in ("img_size", "depth")):
            return f"{base}_reg{cfg.num_register_tokens}" if cfg.num_register_tokens else base
    return None
