"""Tiny torch.distributed helpers that are safe to call in single-process code.

Every helper checks :func:`is_dist` first, so code paths without a process group never issue a collective.
Collectives whose result must carry gradients need an autograd-aware gather (plain ``dist.all_gather`` has no
backward, which silently breaks cross-rank losses): :func:`all_gather_with_grad`. Without gradients:
:func:`gather_batch` (e.g. MoCo's keys entering its queue) and MoCo's Shuffle-BN, :func:`shuffle_batch` /
:func:`unshuffle_batch`: the key encoder sees the global batch permuted across ranks, so the batch statistics of a
query's sub-batch and of its positive key's sub-batch differ and cannot leak the positive (He et al. 2020, sec.
3.3). The permutation comes from a generator every rank seeds alike (no broadcast); with one process there is
nothing to shuffle across and both are the identity (BN statistics over the whole batch, as MoCo's one-GPU runs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_with_grad",
    "all_reduce_max_",
    "all_reduce_sum_",
    "gather_batch",
    "is_dist",
    "rank",
    "shuffle_batch",
    "unshuffle_batch",
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


@torch.no_grad()
def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (same shape on all ranks) concatenated along dim 0 in rank order; ``x`` on one process."""
    if not is_dist() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def shuffle_batch(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's share of the global batch after a random permutation across ranks, and the global index that
    undoes it (None on one process, where the batch is returned unchanged and nothing is drawn).

    ``generator`` must be in the same state on every rank: all ranks draw the same permutation of the W x N
    gathered samples and rank r keeps positions ``[r N, (r + 1) N)`` of it.
    """
    if not is_dist() or world_size() == 1:
        return x, None
    everything = gather_batch(x)
    perm = torch.randperm(len(everything), generator=generator).to(x.device)
    mine = perm.view(world_size(), -1)[rank()]
    return everything[mine], torch.argsort(perm)


@torch.no_grad()
def unshuffle_batch(y: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    """The outputs ``y`` of a :func:`shuffle_batch`-ed batch back in this rank's original order."""
    if unshuffle is None:
        return y
    everything = gather_batch(y)
    return everything[unshuffle.view(world_size(), -1)[rank()]]

