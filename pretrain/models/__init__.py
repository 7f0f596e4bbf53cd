"""Backbones (DINOv2 ViT family, torchvision-layout ResNets) and heads; no parallelism lives here."""

from .factory import (
    ARCHS,
    RESNET_ARCHS,
    backbone_config,
    backbone_names,
    build_backbone,
    build_model,
    check_state_dict,
    export_backbone,
    is_resnet,
    normalize_state_dict,
)
from .resnet import ResNet, ResNetConfig
from .vit import DinoVisionTransformer, ViTConfig

__all__ = [
    "ARCHS", "RESNET_ARCHS", "DinoVisionTransformer", "ResNet", "ResNetConfig", "ViTConfig", "backbone_config",
    "backbone_names", "build_backbone", "build_model", "check_state_dict", "export_backbone", "is_resnet",
    "normalize_state_dict",
]
