"""iBOT masked-image-modelling loss: student patch logits at masked positions predict the teacher's targets.

DINOv2 maths: each masked patch p of image b contributes ``CE_p = -sum_k T[p, k] log softmax(S[p] / temp)_k``,
weighted by ``1 / m_b`` (m_b = masked patches of image b); the weighted sum is divided by the number of *all*
global images, masked or not. So the loss is the mean over images of each image's mean masked CE, with unmasked
images contributing 0. For distillation (MIM on every patch) pass a mask that is all True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ibot_loss", "masked_patch_weights"]


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """(M,) float32 weights ``1 / m_b`` for every masked patch, in ``masks.flatten().nonzero()`` order."""
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (n_images, n_patches), got {masks.dtype} {tuple(masks.shape)}")
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(torch.float32)
    return per_image[:, None].expand_as(masks)[masks]


def ibot_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float = 0.1,
    *,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked-patch cross-entropy in fp32 (autocast off); gradients reach the student only.

    Args:
        student_patch_logits: (M, K) student head outputs at the masked patches, image-major in the order of
            ``masks.flatten().nonzero()`` (i.e. ``x_norm_patchtokens.flatten(0, 1)[masks.flatten()]``).
        teacher_patch_probs: (M, K) teacher targets for the same patches (centered softmax or Sinkhorn-Knopp of
            the teacher's *unmasked* view). Detached.
        masks: (n_images, n_patches) bool, True = masked, over all global-crop images of this rank; M must equal
            ``masks.sum()``. Images without a masked patch count in the denominator.
        student_temp: student temperature (0.1).
        weights: optional precomputed ``masked_patch_weights(masks)`` (the collate provides it).

    Returns:
        Scalar ``sum_p w_p CE_p / n_images``.
    """
    if student_temp <= 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (n_images, n_patches), got {masks.dtype} {tuple(masks.shape)}")
    if student_patch_logits.ndim != 2 or student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(
            f"student {tuple(student_patch_logits.shape)} and teacher {tuple(teacher_patch_probs.shape)} must be "
            "the same (M, K) shape"
        )
    n_masked = student_patch_logits.shape[0]
    if weights is None:
        if int(masks.sum()) != n_masked:
            raise ValueError(f"got {n_masked} patch rows but masks mark {int(masks.sum())} patches")
        weights = masked_patch_weights(masks)
    elif weights.shape != (n_masked,):
        raise ValueError(f"weights must be ({n_masked},), got {tuple(weights.shape)}")
    n_images = masks.shape[0]
    if n_images == 0:
        raise ValueError("masks has no image")
    with torch.autocast(device_type=student_patch_logits.device.type, enabled=False):
        log_p = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
        ce = -(teacher_patch_probs.detach().float() * log_p).sum(dim=-1)  # (M,)
        return (ce * weights.to(device=ce.device, dtype=torch.float32)).sum() / n_images
