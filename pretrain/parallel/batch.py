"""Cross-rank batch operations of MoCo: plain gathers and Shuffle-BN.

- :func:`gather_batch` - every rank's tensor concatenated in rank order, without gradient (MoCo's
  ``concat_all_gather``: keys entering the queue).
- :func:`shuffle_batch` / :func:`unshuffle_batch` - MoCo's Shuffle-BN (He et al. 2020, sec. 3.3): the key
  encoder sees the global batch permuted across ranks, so the batch statistics of a query's sub-batch and of its
  positive key's sub-batch differ and cannot leak the positive. The permutation is drawn from a generator that
  every rank seeds alike (no broadcast). With one process there is nothing to shuffle across and both are the
  identity (a single process computes BN statistics over the whole batch, as MoCo's one-GPU runs do).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.utils.dist import is_dist, rank, world_size

__all__ = ["gather_batch", "shuffle_batch", "unshuffle_batch"]


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

