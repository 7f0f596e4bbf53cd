"""Gram anchoring loss: an independent float64 loop, gradients reach only the student, finite at extremes, and the
mean over 2 gloo ranks equals the 1-process loss (gradients too)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses.gram import gram_loss


def _feats(b: int = 3, p: int = 5, d: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, p, d, generator=g), torch.randn(b, p, d, generator=g)


@pytest.mark.parametrize("clamp", ["none", "both", "teacher"])
def test_equals_a_float64_loop(clamp):
    s, t = _feats()
    total, count = 0.0, 0
    for i in range(s.shape[0]):
        for a in range(s.shape[1]):
            for b in range(s.shape[1]):
                cs = float(torch.nn.functional.cosine_similarity(s[i, a].double(), s[i, b].double(), dim=0))
                ct = float(torch.nn.functional.cosine_similarity(t[i, a].double(), t[i, b].double(), dim=0))
                if clamp in ("both", "teacher"):
                    ct = max(ct, 0.0)
                if clamp == "both":
                    cs = max(cs, 0.0)
                total += (cs - ct) ** 2
                count += 1
    assert gram_loss(s, t, clamp).item() == pytest.approx(total / count, rel=1e-5)


def test_gradient_reaches_only_the_student_and_extremes_are_finite():
    s, t = _feats()
    s.requires_grad_()
    t.requires_grad_()
    gram_loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert gram_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    huge = torch.full((2, 4, 3), 1e30)
    tiny = torch.full((2, 4, 3), 1e-30)
    assert torch.isfinite(gram_loss(huge, tiny)) and torch.isfinite(gram_loss(torch.zeros(2, 4, 3), huge))
    with pytest.raises(ValueError, match="same B and P"):
        gram_loss(torch.zeros(2, 4, 3), torch.zeros(2, 5, 3))


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        s, t = _feats(b=4)
        local = s[rank * 2:(rank + 1) * 2].clone().requires_grad_()
        loss = gram_loss(local, t[rank * 2:(rank + 1) * 2])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt") for i in range(2)]
    s, t = _feats(b=4)
    s.requires_grad_()
    loss = gram_loss(s, t)
    loss.backward()
    assert torch.allclose((r[0]["loss"] + r[1]["loss"]) / 2, loss.detach(), atol=1e-7)
    assert torch.allclose(torch.cat([r[0]["grad"], r[1]["grad"]]) / 2, s.grad, atol=1e-7)
