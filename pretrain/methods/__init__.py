"""Training methods, one per module, each implementing :class:`pretrain.methods.base.Method`.

A recipe selects one with ``method = "<name>"`` (default ``"dinov2"``); :func:`get_method` looks it up. Importing
this package registers the built-in methods: ``dinov2`` (DINOv2 pretraining) and ``distill`` (DINOv2 distillation
of a frozen teacher into students).
"""

from pretrain.methods.base import METHODS, LossOutput, Method, Part, Views, get_method, register_method
from pretrain.methods.dinov2 import DINOv2Config, DINOv2Method
from pretrain.methods.distill import DistillConfig, DistillMethod
from pretrain.methods.moco import MoCoConfig, MoCoMethod
from pretrain.methods.mocov3 import MoCoV3Config, MoCoV3Method
from pretrain.methods.simclr import SimCLRConfig, SimCLRMethod

__all__ = [
    "METHODS",
    "DINOv2Config",
    "DINOv2Method",
    "DistillConfig",
    "DistillMethod",
    "LossOutput",
    "Method",
    "MoCoConfig",
    "MoCoMethod",
    "MoCoV3Config",
    "MoCoV3Method",
    "Part",
    "SimCLRConfig",
    "SimCLRMethod",
    "Views",
    "get_method",
    "register_method",
]
