"""Sinkhorn-Knopp teacher targets (SwAV / DINOv2), computed in the log domain.

Maths (DINOv2 ``sinkhorn_knopp_teacher``): with ``Q = exp(t / temp)`` of shape (K, B) over the *global* batch,
normalise Q to total mass 1, then ``n_iters`` times: divide each prototype row by its (all-reduced) sum and by K,
divide each sample column by its (local) sum and by B; return ``B * Q`` transposed, so each sample's row sums
to 1 and each prototype receives about B / K of the mass. Here every step is done on ``log Q`` with
``logsumexp`` (max-subtracted, reduced across ranks as max then sum), so logits of any magnitude give neither
overflow nor 0/0: the reference exponentiates without subtracting the max and returns NaN at large logits.
"""

from __future__ import annotations

import math

import torch

from pretrain.utils.dist import all_reduce_max_, all_reduce_sum_

__all__ = ["sinkhorn_knopp"]


def _global_logsumexp(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``logsumexp`` of ``x`` over ``dim`` (None: all elements) where that dimension is split across ranks."""
    if dim is None:
        m = x.amax() if x.numel() else x.new_full((), -math.inf)
    else:
        m = x.amax(dim=dim, keepdim=True) if x.shape[dim] else x.new_full(x.sum(dim=dim, keepdim=True).shape, -math.inf)
    m = all_reduce_max_(m.clone())
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum() if dim is None else torch.exp(x - m).sum(dim=dim, keepdim=True)
    s = all_reduce_sum_(s)
    return torch.log(s) + m


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    temp: float,
    n_iters: int = 3,
    n_samples: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Balanced soft assignments of samples to prototypes; no gradient flows back to ``teacher_logits``.

    Args:
        teacher_logits: (B_local, K) teacher head outputs on this rank, any float dtype (computed in fp32 with
            autocast off).
        temp: teacher temperature (e.g. 0.04 -> 0.07 schedule).
        n_iters: Sinkhorn iterations (3 in DINOv2).
        n_samples: number of valid leading rows on this rank (e.g. masked patches inside a fixed-size padded
            buffer); rows past it are padding, are ignored by every sum and come back as zeros. None = all rows.
            The global sample count B used in the normalisation is the sum of the valid rows over all ranks.

    Returns:
        (B_local, K) float32 probabilities; valid rows sum to 1. With a process group initialised, prototype
        sums and the sample count are all-reduced over the default group; without one no collective is issued.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher_logits must be (B, K), got shape {tuple(teacher_logits.shape)}")
    if temp <= 0:
        raise ValueError(f"temp must be > 0, got {temp}")
    if n_iters < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    n_rows, k = teacher_logits.shape
    device = teacher_logits.device
    if n_samples is None:
        n_valid = torch.tensor(float(n_rows), device=device)
    else:
        if isinstance(n_samples, int) and not 0 <= n_samples <= n_rows:
            raise ValueError(f"n_samples must be in [0, {n_rows}] (rows of teacher_logits), got {n_samples}")
        # A tensor count is clamped rather than checked, so no device sync is forced here.
        n_valid = torch.as_tensor(n_samples, device=device).reshape(()).to(torch.float32).clamp(0, n_rows)
    valid = torch.arange(n_rows, device=device) < n_valid  # (B_local,)
    log_b = torch.log(all_reduce_sum_(n_valid.clone()))  # global number of samples

    with torch.autocast(device_type=device.type, enabled=False):
        # log Q with samples as columns: (K, B_local); padding columns at -inf carry no mass.
        log_q = (teacher_logits.float() / temp).t()
        log_q = torch.where(valid[None, :], log_q, torch.full_like(log_q, -math.inf))
        log_q = log_q - _global_logsumexp(log_q, dim=None)
        for _ in range(n_iters):
            log_q = log_q - _global_logsumexp(log_q, dim=1) - math.log(k)  # each prototype row -> 1/K
            col = torch.logsumexp(log_q, dim=0, keepdim=True)  # local: a sample never spans ranks
            col = torch.where(torch.isfinite(col), col, torch.zeros_like(col))
            log_q = log_q - col - log_b  # each sample column -> 1/B
        probs = torch.exp(log_q + log_b).t()
    return torch.where(valid[:, None], probs, torch.zeros_like(probs)).contiguous()
