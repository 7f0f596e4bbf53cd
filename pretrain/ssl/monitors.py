"""Collapse monitors for self-distillation, as pure functions returning Python floats (no gradient, fp32).

Collapse is quiet in DINO-style training (the loss can look fine), so the loop logs every N steps:

- ``teacher_entropy``: mean per-sample entropy of the teacher targets. -> 0 when every sample picks one
  prototype with certainty (sharpening collapse), -> log K when targets are uniform (centering collapse).
- ``teacher_marginal_entropy``: entropy of the batch-mean teacher distribution. Low = few prototypes used.
- ``kl_teacher_student``: mean KL(teacher || student) on the same views; 0 with a collapsed, trivial agreement.
- ``embedding_std``: mean over dimensions of the per-dimension std of L2-normalised embeddings; about
  1/sqrt(D) when healthy, -> 0 when all embeddings coincide.
- ``effective_rank``: exp(entropy of the normalised singular values) of the features (RankMe, Garrido et al.
  2023); 1 for rank-1 features, up to min(B, D).

All statistics are over the local batch; entropies are in nats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "collapse_metrics",
    "effective_rank",
    "embedding_std",
    "kl_teacher_student",
    "teacher_entropy",
    "teacher_marginal_entropy",
]


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim < 2 or x.numel() == 0:
        raise ValueError(f"{what} must be a non-empty (..., K) tensor, got shape {tuple(x.shape)}")
    return x.detach().reshape(-1, x.shape[-1]).float()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


@torch.no_grad()
def teacher_entropy(teacher_probs: torch.Tensor) -> float:
    """Mean per-sample entropy (nats) of (..., K) teacher probabilities."""
    return float(_entropy(_rows(teacher_probs, "teacher_probs")).mean())


@torch.no_grad()
def teacher_marginal_entropy(teacher_probs: torch.Tensor) -> float:
    """Entropy (nats) of the mean teacher distribution over the batch."""
    return float(_entropy(_rows(teacher_probs, "teacher_probs").mean(dim=0)))


@torch.no_grad()
def kl_teacher_student(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float = 0.1) -> float:
    """Mean over samples of KL(teacher || softmax(student / student_temp)); rows must be the same views."""
    t = _rows(teacher_probs, "teacher_probs")
    s = _rows(student_logits, "student_logits")
    if t.shape != s.shape:
        raise ValueError(f"teacher {tuple(t.shape)} and student {tuple(s.shape)} rows must match")
    log_s = F.log_softmax(s / student_temp, dim=-1)
    return float((t * (torch.log(t.clamp_min(1e-30)) - log_s)).sum(dim=-1).mean())


@torch.no_grad()
def embedding_std(x: torch.Tensor) -> float:
    """Mean over dimensions of the per-dimension std (over the batch) of L2-normalised rows of (B, D) ``x``."""
    z = F.normalize(_rows(x, "x"), dim=-1, eps=1e-8)
    if z.shape[0] < 2:
        raise ValueError("embedding_std needs at least 2 rows")
    return float(z.std(dim=0).mean())


@torch.no_grad()
def effective_rank(x: torch.Tensor, eps: float = 1e-12) -> float:
    """RankMe: exp(entropy of the singular values / their sum) of the (B, D) features (not centred)."""
    s = torch.linalg.svdvals(_rows(x, "x").double())
    total = s.sum()
    if total <= eps:
        return 1.0  # all-zero features: report the fully collapsed value
    p = s / total
    return float(math.exp(float(-(p * torch.log(p.clamp_min(eps))).sum())))


@torch.no_grad()
def collapse_metrics(
    *,
    teacher_probs: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    student_temp: float = 0.1,
    embeddings: torch.Tensor | None = None,
) -> dict[str, float]:
    """All monitors that the given tensors allow, keyed by metric name (for metrics.jsonl / TensorBoard).

    ``teacher_probs`` / ``student_logits``: (N, K) for the same views (e.g. the two global crops);
    ``embeddings``: (B, D) CLS features (e.g. teacher backbone CLS of one global crop).
    """
    out: dict[str, float] = {}
    if teacher_probs is not None:
        out["teacher_entropy"] = teacher_entropy(teacher_probs)
        out["teacher_marginal_entropy"] = teacher_marginal_entropy(teacher_probs)
        if student_logits is not None:
            out["kl_teacher_student"] = kl_teacher_student(teacher_probs, student_logits, student_temp)
    if embeddings is not None:
        out["embedding_std"] = embedding_std(embeddings)
        out["effective_rank"] = effective_rank(embeddings)
    return out
