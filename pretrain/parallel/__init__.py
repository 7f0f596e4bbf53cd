"""Distributed infrastructure: process groups, FSDP2/AC/compile application and the shard-local EMA.

This package is the only place in ``pretrain`` that applies parallelism; models stay plain ``nn.Module``s.
``pretrain.parallel.plan`` dry-runs the sharding plan of a full-size job on a fake process group.
"""

from pretrain.parallel.dist import (
    INIT_METHOD_ENV,
    DistInfo,
    LaunchEnv,
    barrier,
    destroy_distributed,
    device_mesh,
    get_dist_info,
    init_distributed,
    read_launch_env,
)
from pretrain.parallel.ema import assert_same_sharding, ema_buffers_, ema_update_, local_tensor
from pretrain.parallel.parallelize import (
    DEFAULT_FP32_MODULES,
    backbone_modules,
    mixed_precision_policy,
    parallelize,
    resnet_stages,
)

__all__ = [
    "DEFAULT_FP32_MODULES",
    "INIT_METHOD_ENV",
    "DistInfo",
    "LaunchEnv",
    "assert_same_sharding",
    "backbone_modules",
    "barrier",
    "destroy_distributed",
    "device_mesh",
    "ema_buffers_",
    "ema_update_",
    "get_dist_info",
    "init_distributed",
    "local_tensor",
    "mixed_precision_policy",
    "parallelize",
    "read_launch_env",
    "resnet_stages",
]
