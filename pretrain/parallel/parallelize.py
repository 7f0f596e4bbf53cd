"""The one place that applies activation checkpointing, ``torch.compile`` and FSDP2 to a model.

Models stay free of parallelism. ``parallelize`` walks the module tree: every submodule with a ``.blocks``
container is a ViT backbone, and each of its blocks gets activation checkpointing (optional), then ``compile``
(optional), then its own ``fully_shard`` unit; the backbone itself becomes the next unit. A submodule with the
torchvision ResNet layout (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, optional ``fc``) is a ResNet backbone,
sharded per stage: stem (``conv1`` + ``bn1``), ``layer1`` .. ``layer4`` (each also compiled, optionally) and the
``fc`` head, then the backbone. Under a low-precision policy the batch norms of each stage form one more unit
kept in fp32 (they take and return the stage's bf16 activations; their running statistics stay fp32, and bf16
parameters would not match them). Modules named in ``fp32_modules`` (the DINO/iBOT heads by default) are sharded
with an all-fp32 policy. Whatever parameters are left go to a root unit on the model itself.

Student and teacher built from the same code and passed through ``parallelize`` with the same arguments get the
same units with the same shards, so the EMA update can run shard by shard (``pretrain.parallel.ema``).

Module names never change: AC uses the composable ``checkpoint`` and compile uses ``nn.Module.compile``, both in
place, so state-dict keys stay in the official layout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["DEFAULT_FP32_MODULES", "backbone_modules", "mixed_precision_policy", "parallelize", "resnet_stages"]

logger = logging.getLogger(__name__)

#: Submodule names kept in fp32 by default: the projection heads, whose softmax targets suffer most from bf16.
DEFAULT_FP32_MODULES: tuple[str, ...] = ("dino_head", "ibot_head")

_MP_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def mixed_precision_policy(mp_policy: str):
    """The FSDP2 ``MixedPrecisionPolicy`` for ``"bf16"`` (bf16 compute, fp32 gradient reduce) or ``"fp32"``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mp_policy not in _MP_DTYPES:
        raise ValueError(f"mp_policy={mp_policy!r} is not supported: use one of {', '.join(_MP_DTYPES)}")
    return MixedPrecisionPolicy(param_dtype=_MP_DTYPES[mp_policy], reduce_dtype=torch.float32)


def _blocks_of(module: nn.Module) -> list[nn.Module] | None:
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
        return list(blocks)
    return None


def resnet_stages(module: nn.Module) -> list[tuple[str, list[nn.Module]]] | None:
    """``(unit name, modules)`` per stage of a torchvision-layout ResNet (stem, layer1..layer4, head), else None."""
    conv1, bn1 = getattr(module, "conv1", None), getattr(module, "bn1", None)
    layers = [getattr(module, f"layer{i}", None) for i in range(1, 5)]
    if not (isinstance(conv1, nn.Conv2d) and isinstance(bn1, nn.Module)
            and all(isinstance(layer, nn.Sequential) and len(layer) > 0 for layer in layers)):
        return None
    stages: list[tuple[str, list[nn.Module]]] = [("stem", [conv1, bn1])]
    stages += [(f"layer{i}", [layer]) for i, layer in enumerate(layers, 1)]
    fc = getattr(module, "fc", None)
    if isinstance(fc, nn.Module) and any(True for _ in fc.parameters()):
        stages.append(("head", [fc]))
    return stages


def backbone_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified_name, module)`` for every backbone in ``model`` (the model included): each submodule
    with a ``.blocks`` list (ViT) or the torchvision ResNet layout (``resnet_stages``)."""
    for name, module in model.named_modules():
        if _blocks_of(module) is not None or resnet_stages(module) is not None:
            yield name, module


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _shard_resnet(backbone: nn.Module, *, mesh, policy, reshard_after_forward: bool) -> int:
    """``fully_shard`` each stage of a ResNet (and, under a low-precision policy, its norms as one fp32 unit)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Norms compute in fp32 on the stage's low-precision activations and return them in that dtype.
    norm_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
    low_precision = policy.param_dtype not in (None, torch.float32)
    units = 0
    for _, modules in resnet_stages(backbone) or ():
        norms = [m for mod in modules for m in mod.modules() if _is_norm(m)] if low_precision else []
        if norms:
            fully_shard(norms, mesh=mesh, mp_policy=norm_policy, reshard_after_forward=reshard_after_forward)
            units += 1
        rest = [m for m in modules if not (norms and _is_norm(m))]
        if rest:
            fully_shard(rest if len(rest) > 1 else rest[0], mesh=mesh, mp_policy=policy,
                        reshard_after_forward=reshard_after_forward)
            units += 1
    return units


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _apply_ac(block: nn.Module) -> None:
    from torch.distributed._composable import checkpoint

    checkpoint(block)


def parallelize(
    model: nn.Module,
    *,
    mesh=None,
    mp_policy: str = "bf16",
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    compile: bool = False,
    compile_backend: str = "inductor",
    fp32_modules: Sequence[str] = DEFAULT_FP32_MODULES,
    forward_methods: Sequence[str] = (),
) -> nn.Module:
    """Apply AC -> compile -> per-block ``fully_shard`` -> backbone/head/root units to ``model`` in place.

    Args:
        model: a backbone (ViT with ``.blocks`` or ResNet) or a container of backbones and heads (e.g. a student
            ``ModuleDict``).
        mesh: a 1-D ``DeviceMesh`` (``pretrain.parallel.device_mesh(info)``); None means one process without a
            process group: no sharding, only the optional AC and compile.
        mp_policy: ``"bf16"`` (params cast to bf16 for compute, gradients reduced in fp32, fp32 master shards)
            or ``"fp32"``. Modules in ``fp32_modules`` always use fp32.
        reshard_after_forward: free the gathered parameters after each unit's forward (ZeRO-3); False keeps
            them until backward (ZeRO-2 like, more memory, less communication).
        activation_checkpointing: recompute each block's activations in backward (ViTs only: recomputing a
            ResNet's batch norms would update their running statistics twice, so it is refused).
        compile: ``torch.compile`` each block or ResNet stage (``nn.Module.compile``, names unchanged).
        compile_backend: the ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` for quick checks).
        fp32_modules: names (or name suffixes) of submodules sharded with an fp32 policy.
        forward_methods: backbone methods other than ``forward`` that callers invoke directly (e.g.
            ``"forward_features_list"``); each is registered with FSDP so it gathers the root's parameters.
            Register each method once: calling this twice on one model would wrap it twice.

    Returns:
        The same ``model`` object (FSDP2 swaps its class in place to an ``FSDPModule`` subclass).
    """
    policy = mixed_precision_policy(mp_policy)
    backbones = list(backbone_modules(model))
    if not backbones and mesh is not None:
        logger.warning("parallelize: %s has no backbone (.blocks or ResNet stages); sharding it as a single unit",
                       type(model).__name__)
    for name, backbone in backbones:
        stages = resnet_stages(backbone) if _blocks_of(backbone) is None else None
        if stages is not None and activation_checkpointing:
            raise ValueError(f"activation_checkpointing: {name or 'the model'} is a ResNet, whose batch norms would "
                             "update their running statistics again in the recomputation; turn it off")
        units = [mods[0] for unit, mods in stages if unit.startswith("layer")] if stages else _blocks_of(backbone)
        for block in units or ():
            if activation_checkpointing:
                _apply_ac(block)
            if compile:
                block.compile(backend=compile_backend)
    if mesh is None:
        if mp_policy != "fp32":
            logger.debug("parallelize without a mesh: mp_policy=%s is left to autocast", mp_policy)
        return model

    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    fp32_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    # Bottom-up: heads and blocks before the modules that contain them, the root last.
    for name, module in model.named_modules():
        if name and _matches(name, fp32_modules):
            fully_shard(module, mesh=mesh, mp_policy=fp32_policy, reshard_after_forward=reshard_after_forward)
            logger.info("parallelize: %s sharded in fp32", name)
    for name, backbone in backbones:
        blocks = _blocks_of(backbone) or []
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        if not blocks:
            n_units = _shard_resnet(backbone, mesh=mesh, policy=policy, reshard_after_forward=reshard_after_forward)
            logger.info("parallelize: %s (ResNet) sharded as %d stage units + root (%s)", name or "model", n_units,
                        mp_policy)
        if backbone is not model:
            fully_shard(backbone, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        for method in forward_methods:
            if not hasattr(backbone, method):
                raise ValueError(f"forward_methods: {type(backbone).__name__} has no method {method!r}")
            register_fsdp_forward_method(backbone, method)
        if blocks:
            logger.info("parallelize: %s sharded as %d blocks + root (%s)", name or "model", len(blocks), mp_policy)
    if type(model).forward is nn.Module.forward:
        # A container without forward (ModuleDict of backbone + heads) cannot be a root unit: give each child that
        # still has unsharded parameters its own unit instead.
        if any(True for _ in model.parameters(recurse=False)):
            raise ValueError(f"{type(model).__name__} has parameters of its own but no forward: wrap it in a module")
        for name, child in model.named_children():
            if not isinstance(child, FSDPModule) and any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
                logger.info("parallelize: %s sharded as one unit (%s)", name, mp_policy)
    else:
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        if any(backbone is model for _, backbone in backbones):
            for method in forward_methods:  # the model is the backbone: it only became an FSDPModule just now
                register_fsdp_forward_method(model, method)
    return model
