"""Sinkhorn-Knopp: parity with an explicit-loop reference, marginals, padding, extreme logits, no teacher grad."""

import math

import pytest
import torch

from pretrain.losses import sinkhorn_knopp


def _reference_sk(logits: torch.Tensor, temp: float, n_iters: int) -> torch.Tensor:
    """DINOv2's algorithm written with explicit loops in float64 (no max-subtraction)."""
    b, k = logits.shape
    q = [[math.exp(float(logits[i, j]) / temp) for i in range(b)] for j in range(k)]  # (K, B)
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iters):
        for j in range(k):
            s = sum(q[j])
            q[j] = [v / s / k for v in q[j]]
        for i in range(b):
            s = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / s / b
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


def test_matches_explicit_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    for temp, n_iters in ((0.1, 3), (0.5, 1), (0.07, 5)):
        ours = sinkhorn_knopp(logits, temp, n_iters=n_iters)
        ref = _reference_sk(logits, temp, n_iters)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_marginals_rows_sum_to_one_and_columns_balance():
    g = torch.Generator().manual_seed(1)
    b, k = 32, 8
    logits = torch.randn(b, k, generator=g) * 3
    probs = sinkhorn_knopp(logits, 0.5)
    torch.testing.assert_close(probs.sum(1), torch.ones(b))
    # 3 iterations already balance prototypes far better than a plain softmax ...
    softmax_dev = (torch.softmax(logits / 0.5, -1).sum(0) - b / k).abs().max()
    assert (probs.sum(0) - b / k).abs().max() < 0.5 * softmax_dev
    # ... and many iterations converge to exactly uniform prototype mass B / K.
    converged = sinkhorn_knopp(logits, 0.5, n_iters=200)
    torch.testing.assert_close(converged.sum(0), torch.full((k,), b / k), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(converged.sum(1), torch.ones(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_logits_stay_finite(dtype):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(16, 64, generator=g) * 1e4).to(dtype)
    logits[0] = 1e4  # a constant row and a row mixing extremes
    logits[1, ::2] = -1e4
    probs = sinkhorn_knopp(logits, 0.04)
    assert probs.dtype == torch.float32
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(16))
    # The reference algorithm (no max-subtraction) overflows on the same input.
    naive = torch.exp(logits.float() / 0.04)
    assert not torch.isfinite(naive / naive.sum()).all()


def test_under_bf16_autocast_computes_in_fp32():
    logits = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = sinkhorn_knopp(logits.bfloat16(), 0.1)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, sinkhorn_knopp(logits.bfloat16().float(), 0.1))


def test_padding_rows_are_ignored_and_zero():
    logits = torch.randn(10, 7)
    full = sinkhorn_knopp(logits[:6], 0.1)
    for n in (6, torch.tensor([6]), torch.tensor(6)):
        padded = sinkhorn_knopp(logits, 0.1, n_samples=n)
        torch.testing.assert_close(padded[:6], full)
        assert torch.equal(padded[6:], torch.zeros(4, 7))
    assert torch.equal(sinkhorn_knopp(logits, 0.1, n_samples=0), torch.zeros(10, 7))


def test_no_gradient_into_teacher():
    logits = torch.randn(4, 5, requires_grad=True)
    probs = sinkhorn_knopp(logits, 0.1)
    assert not probs.requires_grad and logits.grad is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="temp"):
        sinkhorn_knopp(torch.randn(4, 5), 0.0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn_knopp(torch.randn(4), 0.1)
    with pytest.raises(ValueError, match="n_samples"):
        sinkhorn_knopp(torch.randn(4, 5), 0.1, n_samples=5)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_knopp(torch.randn(4, 5), 0.1, n_iters=0)



def _log_domain_reference(logits: torch.Tensor, temp: float, n_iters: int) -> torch.Tensor:
    """The same iterations on log Q in float64 with logsumexp (exact for logits of any magnitude)."""
    b, k = logits.shape
    log_q = (logits.double() / temp).t()
    log_q = log_q - torch.logsumexp(log_q.reshape(-1), 0)
    for _ in range(n_iters):
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - math.log(b)
    return (log_q + math.log(b)).exp().t()


def test_scaling_form_matches_float64_log_domain_on_head_like_and_hard_logits():
    g = torch.Generator().manual_seed(3)
    cos = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(16, 256, generator=g), dim=0)  # cosine logits, as the heads give
    far = torch.randn(8, 6, generator=g)
    far[3] -= 8.0  # exp((t - max) / 0.04) < 1e-60 for every prototype: a float32 column of zeros without n_b
    wide = torch.randn(20, 12, generator=g) * 30  # exp(t / 0.05) overflows float32 without m_k
    for logits, temp, n_iters in ((cos, 0.02, 3), (cos, 0.01, 3), (cos, 0.07, 1), (far, 0.04, 3), (far, 0.01, 7),
                                  (wide, 0.05, 3), (torch.randn(40, 9, generator=g) * 3, 0.1, 5)):
        probs = sinkhorn_knopp(logits, temp, n_iters)
        ref = _log_domain_reference(logits, temp, n_iters)
        torch.testing.assert_close(probs.double(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(probs.sum(1), torch.ones(len(logits)))
    assert sinkhorn_knopp(far, 0.04)[3].max() > 0.1  # the far sample keeps its mass


def test_padding_content_is_irrelevant_and_input_untouched():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(12, 7, generator=g)
    padded = torch.cat([logits, torch.full((4, 7), 1e30), torch.full((2, 7), -math.inf)])
    before = padded.clone()
    out = sinkhorn_knopp(padded, 0.05, n_samples=12)
    torch.testing.assert_close(out[:12], sinkhorn_knopp(logits, 0.05))
    assert torch.equal(out[12:], torch.zeros(6, 7))
    assert torch.equal(padded, before)
