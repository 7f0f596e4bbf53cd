"""KoLeo regulariser (Kozachenko-Leonenko entropy estimator, Sablayrolles et al. 2019) as used in DINOv2.

On L2-normalised vectors, each row's nearest neighbour (largest dot product, itself excluded) is found without
gradient, and the loss is ``-mean_i log(||x_i - x_nn(i) + eps|| + eps)`` (``PairwiseDistance(p=2, eps)`` as in
the reference). Everything runs in fp32 with autocast off, so duplicate rows give ``-log(eps * sqrt(D) + eps)``,
a finite value, instead of the reference's fp16 ``inf``. With ``distributed=True`` neighbours are searched over
the global batch (rows of all ranks, gathered with gradients); each rank averages over its own rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.utils.dist import all_gather_with_grad, rank, world_size

__all__ = ["koleo_loss"]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, distributed: bool = False) -> torch.Tensor:
    """KoLeo loss of the rows of ``x``.

    Args:
        x: (B, D) features (DINOv2: the student backbone CLS token of one global crop, before the head), any float
            dtype; computed in fp32.
        eps: normalisation / distance epsilon (1e-8).
        distributed: search neighbours over the concatenation of every rank's ``x`` (same B on every rank),
            gathered with ``torch.distributed.nn`` so gradients reach the other ranks' rows. The returned value
            is this rank's mean; averaging gradients over ranks (DDP / FSDP) gives exactly the gradient of the
            single-process loss on the concatenated batch. Without a process group it equals the local loss.

    Returns:
        Scalar loss.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (B, D), got shape {tuple(x.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        local = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        n_local = local.shape[0]
        offset = 0
        pool = local
        if distributed and world_size() > 1:
            pool = all_gather_with_grad(local)
            offset = rank() * n_local
        if pool.shape[0] < 2:
            raise ValueError(f"KoLeo needs at least 2 rows in the (global) batch, got {pool.shape[0]}")
        with torch.no_grad():
            dots = local @ pool.t()  # (B_local, B_pool)
            own = torch.arange(n_local, device=x.device)
            dots[own, own + offset] = -torch.inf
            nn_idx = dots.argmax(dim=1)
        dist = F.pairwise_distance(local, pool[nn_idx], p=2, eps=eps)
        return -torch.log(dist + eps).mean()
