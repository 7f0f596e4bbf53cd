"""Sinkhorn-Knopp teacher targets (SwAV / DINOv2).

Maths (DINOv2 ``sinkhorn_knopp_teacher``): with ``Q = exp(t / temp)`` of shape (K, B) over the *global* batch,
normalise Q to total mass 1, then ``n_iters`` times: divide each prototype row by its (all-reduced) sum and by K,
divide each sample column by its (local) sum and by B; return ``B * Q`` transposed, so each sample's row sums
to 1 and each prototype receives about B / K of the mass.

Computed in scaling form: every step only rescales prototype rows and sample columns, so
``Q = diag(u) P diag(v)`` for a fixed ``P``, and each iteration is two matrix-vector products instead of rewriting
the whole (B, K) matrix (one ``exp`` pass in all; a log-domain form needs eight). ``P = exp(t / temp - m_k - n_b)``
with ``m_k`` the per-prototype max over the global batch (a row scaling, which the first row normalisation removes
exactly, as it removes the global normalisation) and ``n_b = max_k (t_kb / temp - m_k) <= 0`` (a column scaling,
carried in the starting ``v``): every entry of ``P`` lies in [0, 1] and every sample and every prototype has an
entry equal to 1, so no sample's mass underflows and nothing overflows for logits of any magnitude (the reference
exponentiates without subtracting a max and returns NaN at large logits). The first prototype sums take the
samples with their column scaling, where an underflowing ``exp(n_b)`` only drops terms below 1e-38 of a sum >= 1.
"""

from __future__ import annotations

import math

import torch

from pretrain.utils.dist import all_reduce_max_, all_reduce_sum_

__all__ = ["sinkhorn_knopp"]


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
    n_global = all_reduce_sum_(n_valid.clone())  # global number of samples

    with torch.autocast(device_type=device.type, enabled=False):
        x = teacher_logits.float().div(temp).masked_fill_(~valid[:, None], -math.inf)  # a fresh tensor
        m = x.amax(dim=0, keepdim=True) if n_rows else x.new_full((1, k), -math.inf)
        m = all_reduce_max_(m)  # per-prototype max over the global batch
        x.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        n = x.amax(dim=1, keepdim=True) if k else x.new_zeros((n_rows, 1))
        n = torch.where(valid[:, None] & torch.isfinite(n), n, torch.zeros_like(n))  # per-sample max, <= 0
        p = x.sub_(n).exp_()  # (B_local, K) in [0, 1]; padding rows 0
        v = torch.where(valid, n.squeeze(1).exp(), torch.zeros_like(n.squeeze(1)))
        for _ in range(n_iters):
            r = all_reduce_sum_(p.t().mv(v))  # prototype mass over the global batch
            u = torch.where(r > 0, 1.0 / (k * r), torch.zeros_like(r))
            c = p.mv(u)  # sample mass (a sample never spans ranks)
            v = torch.where(valid & (c > 0), 1.0 / (n_global * c), torch.zeros_like(c))
        return p.mul_(u).mul_((n_global * v)[:, None])
