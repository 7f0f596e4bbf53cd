"""Tiny torch.distributed helpers that are safe to call in single-process code.

Every helper checks :func:`is_dist` first, so code paths without a process group never issue a collective.
Collectives whose result must carry gradients need an autograd-aware gather (plain ``dist.all_gather`` has no
backward, which silently breaks cross-rank losses): :func:`all_gather_with_grad`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_with_grad",
    "all_reduce_max_",
    "all_reduce_sum_",
    "is_dist",
    "rank",
    "world_size",
]


def is_dist() -> bool:
    """True when torch.distributed is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default group (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Rank in the default group (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over the default group (no gradient); a no-op without one. Returns ``tensor``."""
    if is_dist() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max in place over the default group (no gradient); a no-op without one. Returns ``tensor``."""
    if is_dist() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's tensor. Backward: sum the gradient over ranks, keep this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # all_reduce + slice rather than reduce_scatter, which gloo lacks; gathered features are small.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, differentiably.

    All ranks must pass the same shape (a ValueError names the mismatch). The backward sums, on each rank, the
    gradients every rank produced for that rank's slice, so with data-parallel gradient averaging the result
    equals the single-process gradient of the mean of the per-rank losses. Without a process group the input
    is returned unchanged. (Same semantics as ``torch.distributed.nn.functional.all_gather``, which torch 2.13
    deprecates; this version uses only public collectives and works on gloo and NCCL.)
    """
    if not is_dist() or world_size() == 1:
        return tensor
    shape = torch.tensor(list(tensor.shape), dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            f"all_gather_with_grad needs the same shape on every rank, got {[s.tolist() for s in shapes]}; "
            "use the same per-rank batch size"
        )
    return _AllGatherWithGrad.apply(tensor)
