"""Gram anchoring (DINOv3): keep the student's patch-similarity structure close to a Gram teacher's.

For each image, the Gram matrix of its L2-normalised patch features ``X`` (P, D) is ``G = X X^T`` (P, P): the
cosine similarity of every pair of patches. The loss is the mean squared difference between the student's and the
Gram teacher's matrices (``||G_S - G_G||_F^2 / P^2``, averaged over images), so it constrains *relations* between
patches, not the features themselves; the teacher side carries no gradient. ``clamp_negative`` optionally zeroes
negative similarities (``"both"`` matrices or only the ``"teacher"``'s), options DINOv3's code exposes. With
per-image matrices the value is a mean over images, so with equal per-rank batches the mean over ranks equals the
single-process loss on the concatenated batch and data-parallel gradient averaging gives its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gram_loss"]


def gram_loss(student: torch.Tensor, teacher: torch.Tensor, clamp_negative: str = "none") -> torch.Tensor:
    """Mean squared difference of per-image patch Gram matrices; ``student``/``teacher`` are (B, P, D) patch
    features (any float dtype; computed in fp32), the teacher's detached."""
    if student.ndim != 3 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student and teacher must be (B, P, D) with the same B and P, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")  # fmt: skip
    if clamp_negative not in ("none", "both", "teacher"):
        raise ValueError(f"clamp_negative must be 'none', 'both' or 'teacher', got {clamp_negative!r}")
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.detach().float(), dim=-1)
    gs, gt = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
    if clamp_negative in ("both", "teacher"):
        gt = gt.clamp_min(0.0)
    if clamp_negative == "both":
        gs = gs.clamp_min(0.0)
    return (gs - gt).pow(2).mean()
