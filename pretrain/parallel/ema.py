"""Shard-local EMA of the teacher towards the student, with no communication.

FSDP2 keeps each parameter as a ``DTensor`` whose local shard lives on this rank. When student and teacher were
sharded identically (same module code, same ``parallelize`` arguments), shard ``i`` of a teacher parameter holds
exactly the elements of shard ``i`` of the matching student parameter, so the update
``teacher = m * teacher + (1 - m) * student`` can run on the local shards alone. Without a process group the
parameters are plain tensors and the same code runs on them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["assert_same_sharding", "ema_buffers_", "ema_update_", "local_tensor"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds for ``t``: the local shard of a ``DTensor``, else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _params(x: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return list(x.parameters()) if isinstance(x, nn.Module) else list(x)


def _placements(t: torch.Tensor) -> tuple | None:
    return tuple(t.placements) if hasattr(t, "placements") else None


def assert_same_sharding(
    teacher: nn.Module | Iterable[torch.Tensor], student: nn.Module | Iterable[torch.Tensor]
) -> None:
    """Raise ``ValueError`` unless both sides have the same parameters with the same shapes, shards and dtypes."""
    t_params, s_params = _params(teacher), _params(student)
    if len(t_params) != len(s_params):
        raise ValueError(
            f"teacher has {len(t_params)} parameters but student has {len(s_params)}: build both from the same "
            "config and parallelize them with the same arguments"
        )
    for i, (t, s) in enumerate(zip(t_params, s_params)):
        if t.shape != s.shape or t.dtype != s.dtype:
            raise ValueError(f"parameter {i}: teacher {tuple(t.shape)}/{t.dtype} vs student {tuple(s.shape)}/{s.dtype}")
        if _placements(t) != _placements(s) or local_tensor(t).shape != local_tensor(s).shape:
            raise ValueError(
                f"parameter {i} ({tuple(t.shape)}) is sharded differently in teacher ({_placements(t)}, local "
                f"{tuple(local_tensor(t).shape)}) and student ({_placements(s)}, local "
                f"{tuple(local_tensor(s).shape)}): parallelize both with the same mesh and arguments"
            )


@torch.no_grad()
def ema_update_(
    teacher_params: nn.Module | Iterable[torch.Tensor],
    student_params: nn.Module | Iterable[torch.Tensor],
    momentum: float,
    *,
    check: bool = False,
) -> None:
    """In place: ``teacher = momentum * teacher + (1 - momentum) * student``, shard by shard, no collectives.

    Args:
        teacher_params: the teacher's parameters (or the teacher module), in the same order as the student's.
        student_params: the student's parameters (or module).
        momentum: EMA momentum in [0, 1]; 1 keeps the teacher, 0 copies the student.
        check: verify shapes and sharding first (``assert_same_sharding``); cheap, but off in the hot loop.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum} must lie in [0, 1]")
    t_params, s_params = _params(teacher_params), _params(student_params)
    if check:
        assert_same_sharding(t_params, s_params)
    elif len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters but student has {len(s_params)}")
    t_local = [local_tensor(t) for t in t_params]
    s_local = [local_tensor(s).to(dtype=t.dtype) for t, s in zip(t_local, s_params)]
    if not t_local:
        return
    torch._foreach_mul_(t_local, momentum)
    torch._foreach_add_(t_local, s_local, alpha=1.0 - momentum)


@torch.no_grad()
def ema_buffers_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: floating buffers (BatchNorm running statistics) follow the same EMA, others (counters) are copied.

    FSDP2 does not shard buffers, so each rank updates its own replica, without communication. A no-op for
    models without buffers (the ViTs and heads).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum} must lie in [0, 1]")
    t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
    if len(t_bufs) != len(s_bufs):
        raise ValueError(f"teacher has {len(t_bufs)} buffers but student has {len(s_bufs)}")
    for t, s in zip(t_bufs, s_bufs):
        if t.shape != s.shape:
            raise ValueError(f"buffer shapes differ: teacher {tuple(t.shape)} vs student {tuple(s.shape)}")
        if t.is_floating_point():
            t.lerp_(s.to(t.dtype), 1.0 - momentum)
        else:
            t.copy_(s)
