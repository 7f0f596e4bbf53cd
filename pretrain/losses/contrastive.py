"""Contrastive loss pieces of the instance-discrimination lineage, in fp32 whatever the autocast dtype.

- :func:`info_nce` - InfoNCE of queries against their positive key and a set of negative keys: MoCo v1/v2
  (negatives = the queue of past keys, He et al. 2020) or, with ``negatives=None``, the other keys of the global
  batch (MoCo v3, Chen et al. 2021; InvaSpread, Ye et al. 2019), keys gathered across ranks.
- :func:`nt_xent` - SimCLR's normalised-temperature cross entropy (Chen et al. 2020): the 2N views of a batch, each
  against its partner view, every other view of the global batch a negative, gathered with gradients.
- :func:`invariance_spread_loss` - InvaSpread (Ye et al. 2019): in-batch instance discrimination, the augmented
  view the positive, every other view of the global batch a negative through ``-log(1 - P)``.
- :class:`MemoryBank`, :func:`nce_loss`, :func:`bank_softmax_loss` - InstDisc (Wu et al. 2018): one normalised
  128-d vector per training instance, proximal momentum update of the entries seen, NCE against ``m`` noise
  entries drawn uniformly (``P_n = 1/n``, normaliser ``Z`` estimated once), the full softmax over the bank, or
  (CMC) a softmax over the own entry and the sampled ones.

Logits are computed in log space (``logsumexp`` / ``logaddexp``), so extreme similarities or temperatures give
finite losses. Gathered tensors need the same per-rank batch size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.utils.dist import all_gather_with_grad, gather_batch, is_dist, rank, world_size

__all__ = ["MemoryBank", "bank_scores", "bank_softmax_loss", "estimate_nce_log_z", "estimate_nce_z", "info_nce",
           "invariance_spread_loss", "nce_loss", "nt_xent", "sampled_softmax_loss"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor | None = None,
             temperature: float = 0.07, normalize: bool = True) -> torch.Tensor:  # fmt: skip
    """Mean InfoNCE of ``query`` (N, D) against its ``key`` (N, D).

    With ``negatives`` (K, D) (MoCo's queue) the logits of row i are ``[q_i.k_i, q_i.n_1 .. q_i.n_K] / T`` with
    target 0. Without, the keys of every rank are gathered (with gradients) and row i's target is its own key
    among the global batch (``rank * N + i``): the other instances' keys are the negatives.
    """
    if query.shape != key.shape or query.ndim != 2:
        raise ValueError(f"query and key must both be (N, D), got {tuple(query.shape)} and {tuple(key.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q, k = (_unit(query), _unit(key)) if normalize else (query.float(), key.float())
    if negatives is not None:
        neg = _unit(negatives) if normalize else negatives.float()
        logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ neg.T], dim=1) / temperature
        target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    else:
        keys = all_gather_with_grad(k)
        logits = q @ keys.T / temperature
        target = torch.arange(len(q), device=q.device) + rank() * len(q)
    return F.cross_entropy(logits, target)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent of the two views ``z1``, ``z2`` (N, D) of this rank's N images.

    All 2N' views of the global batch (N' = N x ranks, gathered with gradients) are the candidates of each local
    view; its partner view is the positive, itself is excluded. Returns this rank's mean over its 2N views: with
    data-parallel gradient averaging, exactly the single-process loss on the concatenated batch.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, r = len(z1), rank()
    a, b = _unit(z1), _unit(z2)
    ga, gb = all_gather_with_grad(a), all_gather_with_grad(b)
    total = len(ga)
    views = torch.cat([ga, gb])  # global order: every rank's view 1, then every rank's view 2
    local = torch.cat([a, b])
    rows = torch.cat([torch.arange(n) + r * n, torch.arange(n) + total + r * n]).to(z1.device)
    logits = local @ views.T / temperature
    logits = logits.masked_fill(F.one_hot(rows, 2 * total).bool(), float("-inf"))  # a view is not its own candidate
    target = torch.cat([rows[n:], rows[:n]])
    return F.cross_entropy(logits, target)


def invariance_spread_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
                           detach_candidates: bool = True) -> torch.Tensor:  # fmt: skip
    """InvaSpread's loss (Ye et al. 2019) on the two views ``z1``, ``z2`` (N, D) of this rank's N images.

    Every local view is an anchor; its candidates are the other 2N' - 1 views of the global batch (gathered across
    ranks). ``P_k`` = softmax over the candidates of ``v . v_k / T``; the partner view is the positive (data
    augmentation invariance, ``-log P_partner``) and every other view a negative (spreading, ``-log(1 - P_k)``,
    the probability that anchor and instance k are recognised as one). Returns the mean over local anchors of
    ``-log P_partner - sum_k log(1 - P_k)``. ``detach_candidates`` (the released code) passes gradients through the
    anchors only. ``log(1 - P_k)`` is exact in log space: ``log1p(-P_k)`` where ``P_k <= 1/2`` (every candidate but
    a row's largest) and ``logsumexp`` of the other candidates for the largest, so extreme logits stay finite.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, r = len(z1), rank()
    a, b = _unit(z1), _unit(z2)
    if detach_candidates:
        ga, gb = gather_batch(a.detach()), gather_batch(b.detach())
    else:
        ga, gb = all_gather_with_grad(a), all_gather_with_grad(b)
    total = len(ga)
    if total < 2:
        raise ValueError("InvaSpread needs at least 2 images in the global batch")
    views = torch.cat([ga, gb])  # every rank's view 1, then every rank's view 2
    rows = torch.cat([torch.arange(n) + r * n, torch.arange(n) + total + r * n]).to(z1.device)
    partner = torch.cat([rows[n:], rows[:n]])
    logits = torch.cat([a, b]) @ views.T / temperature
    own = F.one_hot(rows, 2 * total).bool()
    logits = logits.masked_fill(own, float("-inf"))
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    log_p = logits - lse
    top = logits.argmax(dim=1, keepdim=True)
    p_rest = log_p.exp().scatter(1, top, 0.0)  # P <= 1/2 everywhere but (maybe) at each row's largest logit
    log_1mp_top = torch.logsumexp(logits.scatter(1, top, float("-inf")), dim=1, keepdim=True) - lse
    log_1mp = torch.log1p(-p_rest).scatter(1, top, log_1mp_top)
    negative = ~(own | F.one_hot(partner, 2 * total).bool())
    spread = torch.where(negative, log_1mp, torch.zeros_like(log_1mp)).sum(dim=1)
    return -(log_p.gather(1, partner[:, None])[:, 0] + spread).mean()


class MemoryBank(nn.Module):
    """One unit vector per training instance (InstDisc's memory bank), identical on every rank.

    The vectors are a buffer (``vectors``), so a method's checkpoint holds them. Entries start as random unit
    vectors (seeded). :meth:`update` moves the entries of a batch towards the new features,
    ``v_i <- normalize(m v_i + (1 - m) f_i)`` (the proximal update; InstDisc uses m = 0.5), after gathering every
    rank's (index, feature) pairs so all ranks apply the same update.
    """

    vectors: torch.Tensor

    def __init__(self, size: int, dim: int, momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if size < 2 or dim < 1:
            raise ValueError(f"a memory bank needs size >= 2 and dim >= 1, got size={size}, dim={dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("vectors", _unit(torch.randn(size, dim, generator=g)))
        self.momentum = momentum

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Apply the momentum update for ``features`` (N, D) of instances ``indices`` (N,) of every rank."""
        idx, f = indices.long(), _unit(features.detach())
        if is_dist() and world_size() > 1:
            parts_i = [torch.empty_like(idx) for _ in range(world_size())]
            parts_f = [torch.empty_like(f) for _ in range(world_size())]
            dist.all_gather(parts_i, idx)
            dist.all_gather(parts_f, f)
            idx, f = torch.cat(parts_i), torch.cat(parts_f)
        mixed = self.momentum * self.vectors[idx] + (1.0 - self.momentum) * f
        self.vectors[idx] = _unit(mixed)  # a repeated index: the last occurrence wins, on every rank alike


def bank_scores(features: torch.Tensor, indices: torch.Tensor, bank: MemoryBank,
                noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """fp32 cosine scores (whatever the autocast dtype) of unit ``features`` (N, D) against their own bank entries
    ``indices`` (N,) and the noise entries ``noise`` (N, m): ``(own (N,), other (N, m))``, no (N, m, D) product."""
    f = _unit(features)
    with torch.autocast(f.device.type, enabled=False):
        own = (f * bank.vectors[indices.long()]).sum(-1)
        other = torch.bmm(bank.vectors[noise.long()], f[:, :, None]).squeeze(-1)
    return own, other


def estimate_nce_log_z(features: torch.Tensor, bank: MemoryBank, noise: torch.Tensor, temperature: float) -> float:
    """``log Z`` of InstDisc's Monte-Carlo normaliser ``Z ~ n x mean(exp(v . f / T))`` over the noise entries of a
    batch, in float64 log space (tiny temperatures cannot overflow), in chunks of rows."""
    chunks = [bank_scores(f, n[:, 0], bank, n)[1] for f, n in zip(features.detach().split(256), noise.split(256))]
    scores = torch.cat(chunks).double() / temperature
    return float(torch.logsumexp(scores.flatten(), 0) - math.log(scores.numel()) + math.log(len(bank)))


def estimate_nce_z(features: torch.Tensor, bank: MemoryBank, noise: torch.Tensor, temperature: float) -> float:
    """``exp`` of :func:`estimate_nce_log_z`."""
    return math.exp(estimate_nce_log_z(features, bank, noise, temperature))


def nce_loss(features: torch.Tensor, indices: torch.Tensor, bank: MemoryBank, noise: torch.Tensor,
             temperature: float = 0.07, z: float = 1.0, *, log_z: float | None = None) -> torch.Tensor:  # fmt: skip
    """Mean NCE loss of InstDisc: each feature's own bank entry is the data sample, ``noise`` (N, m) bank indices
    drawn uniformly are the noise samples.

    ``P(i|v) = exp(v . f_i / T) / Z``, ``h = P / (P + m P_n)`` with ``P_n = 1/n``;
    loss = ``-log h(own) - sum over noise of log(1 - h(noise))``, averaged over the batch. ``log_z`` (instead of
    ``z``) keeps normalisers finite that ``exp`` would under- or overflow at tiny temperatures.
    """
    if noise.ndim != 2 or len(noise) != len(features):
        raise ValueError(f"noise must be (N, m) bank indices for N={len(features)} features, got {tuple(noise.shape)}")
    if (log_z is None and z <= 0) or temperature <= 0 or (log_z is not None and not math.isfinite(log_z)):
        raise ValueError(f"z and temperature must be > 0 (log_z finite), got z={z}, log_z={log_z}, "
                         f"temperature={temperature}")
    lz = math.log(z) if log_z is None else log_z
    own, other = bank_scores(features, indices, bank, noise)
    own, other = own / temperature - lz, other / temperature - lz
    log_mpn = math.log(noise.shape[1] / len(bank))
    log_h = own - torch.logaddexp(own, torch.full_like(own, log_mpn))
    log_1mh = log_mpn - torch.logaddexp(other, torch.full_like(other, log_mpn))
    return -(log_h + log_1mh.sum(dim=1)).mean()


def sampled_softmax_loss(features: torch.Tensor, indices: torch.Tensor, bank: MemoryBank, noise: torch.Tensor,
                         temperature: float = 0.07) -> torch.Tensor:  # fmt: skip
    """Mean cross entropy of ``[f . v_own, f . v_noise_1 .. f . v_noise_m] / T`` with target 0 (the CMC release's
    softmax variant of the bank loss)."""
    own, other = bank_scores(features, indices, bank, noise)
    logits = torch.cat([own[:, None], other], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def bank_softmax_loss(features: torch.Tensor, indices: torch.Tensor, bank: MemoryBank,
                      temperature: float = 0.07) -> torch.Tensor:  # fmt: skip
    """InstDisc's full non-parametric softmax: cross entropy of ``v . f_j / T`` over every bank entry ``j``,
    target the instance's own entry."""
    logits = _unit(features) @ bank.vectors.T / temperature
    return F.cross_entropy(logits, indices.long())
