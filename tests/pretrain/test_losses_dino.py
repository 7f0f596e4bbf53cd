"""DINO multi-crop loss: explicit-loop reference, DINOv2's swapped-teacher formulation, layouts, grads, extremes."""

import math

import pytest
import torch

from pretrain.losses import dino_loss, n_dino_pairs


def _reference(student_views, teacher_views, temp, n_shared):
    """Sum over pairs (s, t), s != t for shared global views, of the batch-mean CE, / number of pairs."""
    total, pairs = 0.0, 0
    for si, s in enumerate(student_views):
        for ti, t in enumerate(teacher_views):
            if si == ti and si < n_shared:
                continue
            pairs += 1
            ce = 0.0
            for b in range(s.shape[0]):
                logits = [float(v) / temp for v in s[b]]
                m = max(logits)
                lse = m + math.log(sum(math.exp(v - m) for v in logits))
                ce += -sum(float(t[b, k]) * (logits[k] - lse) for k in range(len(logits)))
            total += ce / s.shape[0]
    return total / pairs


def _views(n_s, n_t, b=3, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(b, k, generator=g) for _ in range(n_s)]
    teacher = [torch.softmax(torch.randn(b, k, generator=g) / 0.5, -1) for _ in range(n_t)]
    return student, teacher


def test_matches_reference_for_2_global_8_local():
    student, teacher = _views(10, 2)
    assert n_dino_pairs(10, 2, 2) == 18
    expected = _reference(student, teacher, 0.1, 2)
    assert float(dino_loss(student, teacher)) == pytest.approx(expected, rel=1e-5)
    flat = dino_loss(torch.cat(student), torch.cat(teacher), 0.1)  # (n * B, K) layouts
    assert float(flat) == pytest.approx(expected, rel=1e-5)
    stacked = dino_loss(torch.stack(student), torch.stack(teacher))
    assert float(stacked) == pytest.approx(expected, rel=1e-5)


def test_equals_dinov2_swapped_teacher_formulation():
    student, teacher = _views(6, 2, b=4, k=5, seed=3)
    temp = 0.1

    def ce_mean(s, t):
        return -(t * torch.log_softmax(s / temp, -1)).sum(-1).mean()

    local = sum(ce_mean(s, t) for s in student[2:] for t in teacher)
    swapped = torch.cat([teacher[1], teacher[0]])
    global_ = ce_mean(torch.cat(student[:2]), swapped) * 2
    expected = (local + global_) / (len(student[2:]) * 2 + 2)
    torch.testing.assert_close(dino_loss(student, teacher, temp), expected)


def test_other_view_counts_and_no_shared_views():
    student, teacher = _views(4, 3, seed=5)
    for n_shared in (0, 2, 3):
        expected = _reference(student, teacher, 0.2, n_shared)
        got = dino_loss(student, teacher, 0.2, n_shared_views=n_shared)
        assert float(got) == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_student_only():
    student, teacher = _views(4, 2)
    s = torch.cat(student).requires_grad_()
    t = torch.cat(teacher).requires_grad_()
    dino_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_finite(dtype):
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(10 * 4, 32, generator=g) * 1e4).to(dtype).requires_grad_()
    t = torch.softmax(torch.randn(2 * 4, 32, generator=g) * 1e4, -1).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino_loss(s, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_bad_layouts():
    student, teacher = _views(4, 2)
    with pytest.raises(ValueError, match="multiple"):
        dino_loss(torch.randn(7, 6), torch.cat(teacher))
    with pytest.raises(ValueError, match="same B and K"):
        dino_loss([student[0], torch.randn(2, 6)], teacher)
    with pytest.raises(ValueError, match="n_shared_views"):
        dino_loss(student, teacher, n_shared_views=3)
    with pytest.raises(ValueError, match="student views"):
        dino_loss([torch.randn(3, 5)], teacher)
