"""Backbone registry, strict loading of official DINOv2 / torchvision-layout ResNet / dinoforge checkpoints, and export
in the official layouts."""

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

from .resnet import ResNet, ResNetConfig
from .vit import DinoVisionTransformer, ViTConfig

logger = logging.getLogger(__name__)

Backbone = DinoVisionTransformer | ResNet
BackboneConfig = ViTConfig | ResNetConfig

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
#: ResNet architectures by name (torchvision layout). ``<name>_small`` uses the 3x3 stride-1 stem without max pool.
RESNET_ARCHS: dict[str, dict[str, Any]] = {
    "resnet18": {"depth": 18},
    "resnet34": {"depth": 34},
    "resnet50": {"depth": 50},
    "resnet101": {"depth": 101},
    # Narrow ResNet-18 (64-d features) with the small stem, for tests and CPU demos.
    "resnet_test": {"depth": 18, "width": 8, "stem": "small"},
}
_REG = re.compile(r"^(?P<base>.+)_reg(?P<n>\d+)$")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def backbone_names() -> list[str]:
    """All buildable names: each ViT and its ``_reg4`` variant, each ResNet and its ``_small`` variant."""
    vits = [n for a in ARCHS for n in (a, f"{a}_reg4")]
    return vits + [n for a, arch in RESNET_ARCHS.items() for n in ((a,) if "stem" in arch else (a, f"{a}_small"))]


def is_resnet(name: str) -> bool:
    """Whether ``name`` is a ResNet architecture (``resnet50``, ``resnet18_small``, ...)."""
    return name in RESNET_ARCHS or (name.endswith("_small") and name.removesuffix("_small") in RESNET_ARCHS)


def _config(cls: type, kwargs: dict[str, Any], overrides: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown backbone override(s) {unknown}; known: {sorted(known)}")
    return cls(**{**kwargs, **overrides})


def backbone_config(name: str, **overrides: Any) -> BackboneConfig:
    """The config for ``name`` (e.g. ``vitl14``, ``vitg14_reg4``, ``resnet50``, ``resnet18_small``) with overrides.

    A ``ViTConfig`` for ViTs, a ``ResNetConfig`` for ResNets; overrides are fields of that config.
    """
    if is_resnet(name):
        base = name.removesuffix("_small") if name not in RESNET_ARCHS else name
        kwargs = {**RESNET_ARCHS[base], **({"stem": "small"} if base != name else {})}
        return _config(ResNetConfig, kwargs, overrides)
    match = _REG.match(name)
    base = match["base"] if match else name
    if base not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(backbone_names())}")
    kwargs: dict[str, Any] = dict(ARCHS[base])
    if match:
        kwargs.update(num_register_tokens=int(match["n"]), interpolate_offset=0.0, interpolate_antialias=True)
    return _config(ViTConfig, kwargs, overrides)


def build_model(cfg: BackboneConfig) -> Backbone:
    """The backbone module for a config (random init)."""
    return ResNet(cfg) if isinstance(cfg, ResNetConfig) else DinoVisionTransformer(cfg)


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
    ``blocks.<chunk>.<i>.*`` keys) and ``module.`` prefixes (DDP, also before ``backbone.`` as in DINO's ResNet
    teacher checkpoints).
    """
    for wrapper in ("teacher", "model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
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


def _resnet_state(sd: dict[str, torch.Tensor], overrides: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Fit a torchvision-layout checkpoint to the backbone: without a ``num_classes`` override the classifier
    ``fc.*`` is dropped (a backbone has none); norms of legacy files without ``num_batches_tracked`` get 0."""
    if "num_classes" not in overrides and any(k.startswith("fc.") for k in sd):
        logger.info("dropped the checkpoint's classifier fc (%s classes); pass num_classes to keep it",
                    sd["fc.weight"].shape[0] if "fc.weight" in sd else "?")
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    for key in [k for k in sd if k.endswith(".running_var")]:
        sd.setdefault(key.removesuffix("running_var") + "num_batches_tracked", torch.tensor(0))
    return sd


def build_backbone(name: str | None, weights: str | None = None, **overrides: Any) -> Backbone:
    """Build a backbone by name, optionally loading weights strictly.

    Args:
        name: an entry of ``backbone_names()``; ``None`` reads the architecture from the ``<weights>.json`` sidecar
            that ``export_backbone`` writes.
        weights: local path or fsspec URL of an official DINOv2 backbone checkpoint (e.g.
            ``dinov2_vitg14_reg4_pretrain.pth``), a torchvision-layout ResNet checkpoint or a dinoforge export.
            For ViTs the stored position-embedding grid sets ``img_size`` unless it is overridden. For ResNets a
            classifier ``fc`` in the file is dropped unless ``num_classes`` is given (then it must match).
        overrides: ``ViTConfig`` / ``ResNetConfig`` fields (``drop_path_rate``, ``img_size``, ``norm``, ...).
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
        # every architecture field is in the sidecar config, so any name of the family will do
        name = sidecar.get("name") or ("resnet_test" if "stem" in sidecar["config"] else "vit_test")
        overrides = {**sidecar["config"], **overrides}
    if weights is None:
        return build_model(backbone_config(name, **overrides))

    sd = normalize_state_dict(_read_checkpoint(weights))
    if is_resnet(name):
        sd = _resnet_state(sd, overrides)
    elif "img_size" not in overrides and "pos_embed" in sd:
        patch = overrides.get("patch_size", backbone_config(name).patch_size)
        grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
        overrides = {**overrides, "img_size": grid * patch}
    cfg = backbone_config(name, **overrides)
    with torch.device("meta"):
        model = build_model(cfg)
    check_state_dict(model, sd)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    logger.info("loaded %s weights from %s", name, weights)
    return model


def export_backbone(model: nn.Module | Mapping[str, torch.Tensor], path: str, *, name: str | None = None,
                    prefix: str = "") -> None:
    """Write a backbone in its official key layout (DINOv2 without chunk indices, torchvision for ResNets).

    Args:
        model: a ``DinoVisionTransformer`` / ``ResNet`` or a full state dict (e.g. gathered from FSDP).
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
    resnet = isinstance(cfg, ResNetConfig) or (name is not None and is_resnet(name))
    meta: dict[str, Any] = {"format": "torchvision-resnet" if resnet else "dinov2-backbone", "name": name}
    if cfg is not None:
        meta["config"] = dataclasses.asdict(cfg)
        meta["config"].pop("attn_backend", None)
        if name is None:
            meta["name"] = _guess_name(cfg)
    with fsspec.open(path + ".json", "w") as f:
        json.dump(meta, f, indent=2)


def _guess_name(cfg: BackboneConfig) -> str | None:
    if isinstance(cfg, ResNetConfig):
        for base, arch in RESNET_ARCHS.items():
            if all(getattr(cfg, k) == v for k, v in arch.items()) and cfg.width == arch.get("width", 64):
                return base if "stem" in arch or cfg.stem == "imagenet" else f"{base}_small"
        return None
    for base, arch in ARCHS.items():
        if all(getattr(cfg, k) == v for k, v in arch.items() if k not in ("img_size", "depth")):
            return f"{base}_reg{cfg.num_register_tokens}" if cfg.num_register_tokens else base
    return None
