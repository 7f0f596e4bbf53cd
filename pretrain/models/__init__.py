"""Backbones (DINOv2 ViT family) and heads; no parallelism lives here."""

from .factory import (
    ARCHS,
    backbone_config,
    backbone_names,
    build_backbone,
    check_state_dict,
    export_backbone,
    normalize_state_dict,
)
from .vit import DinoVisionTransformer, ViTConfig

__all__ = [
    "ARCHS", "DinoVisionTransformer", "ViTConfig", "backbone_config", "backbone_names", "build_backbone",
    "check_state_dict", "export_backbone", "normalize_state_dict",
]
