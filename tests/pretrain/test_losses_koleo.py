"""KoLeo: explicit-loop reference, duplicate rows finite (fp32/bf16/fp16, autocast), gradients, errors."""

import math

import pytest
import torch

from pretrain.losses import koleo_loss


def _reference(x, eps=1e-8):
    rows = [[float(v) for v in r] for r in x]
    normed = []
    for r in rows:
        n = max(math.sqrt(sum(v * v for v in r)), eps)
        normed.append([v / n for v in r])
    total = 0.0
    for i, a in enumerate(normed):
        best, best_dot = None, -math.inf
        for j, b in enumerate(normed):
            dot = sum(p * q for p, q in zip(a, b))
            if j != i and dot > best_dot:
                best, best_dot = b, dot
        d = math.sqrt(sum((p - q + eps) ** 2 for p, q in zip(a, best)))
        total += -math.log(d + eps)
    return total / len(normed)


def test_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g)
    assert float(koleo_loss(x)) == pytest.approx(_reference(x), rel=1e-5)
    assert float(koleo_loss(x, distributed=True)) == pytest.approx(_reference(x), rel=1e-5)  # no group: local


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_duplicates_are_finite(dtype):
    x = torch.randn(6, 16)
    x[3] = x[1]
    x = x.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = koleo_loss(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad.float()).all()
    # the duplicated rows contribute -log(||eps|| + eps) = -log(eps * sqrt(D) + eps) each: large but finite
    assert float(loss.detach()) == pytest.approx(_reference(x.detach().float()), rel=1e-4)
    assert float(loss.detach()) > 2 * -math.log(1e-8 * math.sqrt(16) + 1e-8) / 6 - 1.0


def test_gradient_pushes_neighbours_apart():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]], requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    before = koleo_loss(x.detach())
    after = koleo_loss(x.detach() - 0.01 * x.grad)
    assert after < before


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        koleo_loss(torch.randn(4))
