"""Teacher targets from teacher logits: Sinkhorn-Knopp or softmax with an EMA center (no gradient)."""

from __future__ import annotations

import torch

from pretrain.losses.centering import SoftmaxCenter
from pretrain.losses.sinkhorn import sinkhorn_knopp

__all__ = ["teacher_probs"]


@torch.no_grad()
def teacher_probs(logits: torch.Tensor, temp: float, *, centering: str, center: SoftmaxCenter,
                  sinkhorn_iters: int = 3) -> torch.Tensor:
    """Target probabilities of ``logits`` at temperature ``temp``.

    ``centering`` is ``"sinkhorn"`` (Sinkhorn-Knopp, ``center`` untouched) or ``"softmax"`` (softmax of the logits
    minus ``center``, which is then updated with this batch).
    """
    if centering == "sinkhorn":
        return sinkhorn_knopp(logits, temp, sinkhorn_iters)
    if centering != "softmax":
        raise ValueError(f"centering must be 'softmax' or 'sinkhorn', got {centering!r}")
    probs = center.teacher_probs(logits, temp)
    center.update(logits)
    return probs
