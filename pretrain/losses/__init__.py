"""The DINOv2 objective's losses and teacher-target normalisations, each in fp32 whatever the autocast dtype.

- :func:`sinkhorn_knopp` and :class:`SoftmaxCenter` turn teacher logits into targets (no gradient);
  :func:`teacher_probs` picks one of them.
- :func:`dino_loss` (CLS, multi-crop), :func:`ibot_loss` (masked patches), :func:`koleo_loss` (spread of CLS).

Cross-rank statistics (Sinkhorn sums, centers) are reduced over the default process group when one exists; the
global KoLeo gathers with ``torch.distributed.nn`` so gradients flow across ranks.
"""

from pretrain.losses.centering import SoftmaxCenter
from pretrain.losses.dino import dino_loss, n_dino_pairs
from pretrain.losses.ibot import ibot_loss, masked_patch_weights
from pretrain.losses.koleo import koleo_loss
from pretrain.losses.sinkhorn import sinkhorn_knopp
from pretrain.losses.targets import teacher_probs

__all__ = [
    "SoftmaxCenter",
    "dino_loss",
    "ibot_loss",
    "koleo_loss",
    "masked_patch_weights",
    "n_dino_pairs",
    "sinkhorn_knopp",
    "teacher_probs",
]
