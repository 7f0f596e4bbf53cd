"""DINO cross-view loss: student crops predict the teacher's targets of the *other* global views.

For teacher views t (the global crops) and student views s (the same global crops first, then local crops), each
pair with s != t contributes ``mean_b -sum_k P_t[b, k] log softmax(S_s[b] / student_temp)_k``. The loss is the
sum over pairs divided by the number of pairs: for 2 global + 8 local student crops and 2 teacher views that is
(8 * 2 + 2) / 18, DINOv2's ``dino_local_crops_loss + dino_global_crops_loss``. Skipping same-view pairs is the
same as DINOv2's swap of the two teacher views against the two student globals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["dino_loss", "n_dino_pairs"]


def _as_views(x: torch.Tensor | Sequence[torch.Tensor], n_views: int | None, what: str) -> torch.Tensor:
    """Stack a list of (B, K) views, or reshape an (n_views * B, K) tensor, into (n_views, B, K)."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 3:
            return x
        if x.ndim != 2 or n_views is None or x.shape[0] % n_views:
            raise ValueError(f"{what}: expected a list of (B, K) views or (n_views * B, K), got {tuple(x.shape)}")
        return x.reshape(n_views, x.shape[0] // n_views, x.shape[1])
    views = list(x)
    if not views:
        raise ValueError(f"{what}: got no views")
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{what}: every view must be (B, K) with the same B and K, got {sorted(shapes)}")
    return torch.stack(views)


def n_dino_pairs(n_student_views: int, n_teacher_views: int, n_shared_views: int) -> int:
    """Number of (student, teacher) pairs the loss averages over: all pairs minus the same-view ones."""
    return n_student_views * n_teacher_views - n_shared_views


def dino_loss(
    student_logits: torch.Tensor | Sequence[torch.Tensor],
    teacher_probs: torch.Tensor | Sequence[torch.Tensor],
    student_temp: float = 0.1,
    *,
    n_teacher_views: int = 2,
    n_student_views: int | None = None,
    n_shared_views: int | None = None,
) -> torch.Tensor:
    """Multi-crop DINO loss in fp32 (autocast off); gradients reach the student only.

    Args:
        student_logits: student head outputs, view-major: a list of (B, K) tensors, or one (n_student_views * B, K)
            tensor, or (n_student_views, B, K). The first ``n_shared_views`` views are the global crops in the same
            order as the teacher views (view i of the student and teacher is the same image crop); the local
            crops follow.
        teacher_probs: teacher targets (centered softmax or Sinkhorn-Knopp), view-major like the student: a list
            of (B, K), one (n_teacher_views * B, K) tensor, or (n_teacher_views, B, K). Not swapped: pairing is
            done here. Detached.
        student_temp: student temperature (0.1).
        n_teacher_views: views in a flat 2-D ``teacher_probs`` (ignored for lists / 3-D tensors).
        n_student_views: views in a flat 2-D ``student_logits``; default: rows / B with B from the teacher.
        n_shared_views: student views that are also teacher views (same-view pairs skipped); default: the number
            of teacher views. Use 0 when the student sees only crops the teacher does not.

    Returns:
        Scalar: sum over (student, teacher) pairs of the batch-mean cross-entropy, divided by the number of pairs.
    """
    if student_temp <= 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    teacher = _as_views(teacher_probs, n_teacher_views, "teacher_probs")
    n_t, batch, k = teacher.shape
    if n_student_views is None and isinstance(student_logits, torch.Tensor) and student_logits.ndim == 2:
        if student_logits.shape[0] % batch:
            raise ValueError(f"student_logits rows {student_logits.shape[0]} are not a multiple of B={batch}")
        n_student_views = student_logits.shape[0] // batch
    student = _as_views(student_logits, n_student_views, "student_logits")
    n_s = student.shape[0]
    if student.shape[1:] != (batch, k):
        raise ValueError(f"student views are {tuple(student.shape[1:])}, teacher views are {(batch, k)}")
    n_shared = n_t if n_shared_views is None else n_shared_views
    if not 0 <= n_shared <= min(n_s, n_t):
        raise ValueError(f"n_shared_views must be in [0, {min(n_s, n_t)}], got {n_shared}")
    n_pairs = n_dino_pairs(n_s, n_t, n_shared)
    if n_pairs <= 0:
        raise ValueError(f"no (student, teacher) pair left: {n_s} student views, {n_t} teacher views")

    with torch.autocast(device_type=student.device.type, enabled=False):
        log_p = F.log_softmax(student.float() / student_temp, dim=-1)  # (n_s, B, K)
        t = teacher.detach().float()
        log_p_sum = log_p.sum(dim=0)  # (B, K): every student view
        total = log_p.new_zeros(())
        for i in range(n_t):
            # teacher view i against every student view except itself (if it is a shared global view)
            others = log_p_sum - log_p[i] if i < n_shared else log_p_sum
            total = total + (t[i] * others).sum()
        return -total / (batch * n_pairs)
