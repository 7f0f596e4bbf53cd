"""Contrastive loss pieces against straightforward float64 loops; extreme inputs stay finite; a 2-process gloo run
equals the 1-process run on the concatenated batch (gathered keys / views with gradients, memory-bank updates)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses.contrastive import MemoryBank, bank_softmax_loss, estimate_nce_z, info_nce, nce_loss, nt_xent

WORLD = 2


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _data(n: int = 6, d: int = 5, k: int = 7):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(k, d, generator=g))


def _ce(logits: list[float], target: int) -> float:
    top = max(logits)
    return -(logits[target] - top - math.log(sum(math.exp(x - top) for x in logits)))


def test_info_nce_queue_and_in_batch_equal_loops():
    q, k, neg = (x.double() for x in _data())
    qn, kn, nn_ = _unit(q), _unit(k), _unit(neg)
    t = 0.2
    want = sum(_ce([float(qn[i] @ kn[i]) / t] + [float(qn[i] @ nn_[j]) / t for j in range(len(nn_))], 0)
               for i in range(len(q))) / len(q)  # fmt: skip
    assert info_nce(q, k, neg, temperature=t).item() == pytest.approx(want, rel=1e-5)
    want = sum(_ce([float(qn[i] @ kn[j]) / t for j in range(len(k))], i) for i in range(len(q))) / len(q)
    assert info_nce(q, k, temperature=t).item() == pytest.approx(want, rel=1e-5)


def test_nt_xent_equals_loop():
    z1, z2, _ = (x.double() for x in _data())
    views = torch.cat([_unit(z1), _unit(z2)])
    n, t = len(z1), 0.5
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        logits = [float(views[i] @ views[j]) / t for j in others]
        total += _ce(logits, others.index(partner))
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_nce_and_bank_softmax_equal_loops():
    feats, _, _ = _data(n=4, d=8)
    bank = MemoryBank(20, 8, seed=1)
    idx = torch.tensor([3, 7, 11, 19])
    noise = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(2))
    t, z = 0.1, 37.0
    v, mem = _unit(feats.double()), bank.vectors.double()
    pn, m = 1.0 / 20, 5
    total = 0.0
    for i in range(4):
        p = math.exp(float(v[i] @ mem[idx[i]]) / t) / z
        total -= math.log(p / (p + m * pn))
        for j in noise[i].tolist():
            p = math.exp(float(v[i] @ mem[j]) / t) / z
            total -= math.log(1 - p / (p + m * pn))
    assert nce_loss(feats, idx, bank, noise, t, z).item() == pytest.approx(total / 4, rel=1e-5)
    want = sum(_ce([float(v[i] @ mem[j]) / t for j in range(20)], int(idx[i])) for i in range(4)) / 4
    assert bank_softmax_loss(feats, idx, bank, t).item() == pytest.approx(want, rel=1e-5)
    scores = [math.exp(float(v[i] @ mem[j]) / t) for i in range(4) for j in noise[i].tolist()]
    assert estimate_nce_z(feats, bank, noise, t) == pytest.approx(20 * sum(scores) / len(scores), rel=1e-5)


def test_memory_bank_proximal_update_and_state():
    bank = MemoryBank(10, 4, momentum=0.5, seed=0)
    before = bank.vectors.clone()
    f = torch.randn(2, 4)
    bank.update(torch.tensor([2, 5]), f)
    want = _unit(0.5 * before[[2, 5]] + 0.5 * _unit(f))
    assert torch.allclose(bank.vectors[[2, 5]], want, atol=1e-6)
    assert torch.equal(bank.vectors[[0, 1, 3]], before[[0, 1, 3]])
    other = MemoryBank(10, 4, seed=9)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.vectors, bank.vectors)
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(10, 4, momentum=1.0)


def test_extreme_inputs_stay_finite():
    q, k, neg = _data()
    huge = q * 1e6
    assert torch.isfinite(info_nce(huge, k * 1e6, neg, temperature=1e-4))
    assert torch.isfinite(info_nce(huge, -k, temperature=1e-4))
    assert torch.isfinite(nt_xent(huge, -huge, temperature=1e-4))
    bank = MemoryBank(16, 5)
    noise = torch.randint(0, 16, (6, 4), generator=torch.Generator().manual_seed(0))
    idx = torch.arange(6)
    for t, z in ((1e-4, 1.0), (1e-4, 1e30), (10.0, 1e-30)):
        assert torch.isfinite(nce_loss(huge, idx, bank, noise, t, z))
    assert torch.isfinite(bank_softmax_loss(huge, idx, bank, 1e-4))
    x = huge.clone().requires_grad_()
    nt_xent(x, k, temperature=1e-3).backward()
    assert torch.isfinite(x.grad).all()


def _losses(z1, z2, q, k):
    from pretrain.losses.contrastive import invariance_spread_loss

    return {"nt_xent": nt_xent(z1, z2, temperature=0.3), "moco3": info_nce(q, k, temperature=0.2),
            "invaspread": invariance_spread_loss(z1, z2, 0.2, detach_candidates=False),
            "invaspread_detached": invariance_spread_loss(z2, z1, 0.3)}


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z1, z2, _ = _data(n=8)
        q, k, _ = _data(n=8, d=5, k=1)
        sl = slice(rank * 4, (rank + 1) * 4)
        parts = {n: x[sl].clone().requires_grad_() for n, x in (("z1", z1), ("z2", z2), ("q", q), ("k", k))}
        out = {}
        for name, loss in _losses(parts["z1"], parts["z2"], parts["q"], parts["k"]).items():
            out[name] = loss.detach()
            loss.backward()
        out.update({f"grad_{n}": p.grad for n, p in parts.items()})
        bank = MemoryBank(12, 5, seed=3)
        bank.update(torch.tensor([0, 3, 5, 7])[rank * 2:(rank + 1) * 2], q[sl][:2])
        out["bank"] = bank.vectors
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    z1, z2, _ = _data(n=8)
    q, k, _ = _data(n=8, d=5, k=1)
    full = {n: x.clone().requires_grad_() for n, x in (("z1", z1), ("z2", z2), ("q", q), ("k", k))}
    for name, loss in _losses(full["z1"], full["z2"], full["q"], full["k"]).items():
        # the mean of the per-rank losses is the single-process loss
        assert torch.allclose(sum(r[name] for r in ranks) / WORLD, loss.detach(), atol=1e-6), name
        loss.backward()
    for n, p in full.items():  # data-parallel averaging of the per-rank gradients gives the full-batch gradient
        got = torch.cat([r[f"grad_{n}"] for r in ranks]) / WORLD
        assert torch.allclose(got, p.grad, atol=1e-6), n
    bank = MemoryBank(12, 5, seed=3)
    bank.update(torch.tensor([0, 3, 5, 7]), torch.cat([q[0:2], q[4:6]]))
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"]) and torch.allclose(ranks[0]["bank"], bank.vectors)


def test_invariance_spread_loss_equals_a_float64_loop_and_stays_finite():
    from pretrain.losses.contrastive import invariance_spread_loss

    z1, z2, _ = (x.double() for x in _data(n=5))
    views = torch.cat([_unit(z1), _unit(z2)])
    n, t = len(z1), 0.1
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        e = {j: math.exp(float(views[i] @ views[j]) / t) for j in others}
        s = sum(e.values())
        total -= math.log(e[partner] / s) + sum(math.log(1 - e[j] / s) for j in others if j != partner)
    for detach in (True, False):
        assert invariance_spread_loss(z1, z2, t, detach).item() == pytest.approx(total / (2 * n), rel=1e-6)
    # gradients: only through the anchors when the candidates are detached (the released code), else both ways
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    invariance_spread_loss(a, b, t, detach_candidates=True).backward()
    c, d = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    invariance_spread_loss(c, d, t, detach_candidates=False).backward()
    assert not torch.allclose(a.grad, c.grad)
    # extremes: identical views (every candidate ties), huge logits, one dominating candidate
    for x, y, temp in ((q := _data()[0] * 1e6, q, 1e-4), (q, -q, 1e-4), (q, q + 1e-3 * torch.randn_like(q), 1e-6)):
        xa = x.clone().requires_grad_()
        loss = invariance_spread_loss(xa, y, temp, detach_candidates=False)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xa.grad).all()
