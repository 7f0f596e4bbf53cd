"""iBOT masked-patch loss: per-image 1/m_b weighting over all global images, grads, all-patch mode."""

import math

import pytest
import torch

from pretrain.losses import ibot_loss, masked_patch_weights


def _ce(s_row, t_row, temp):
    logits = [float(v) / temp for v in s_row]
    m = max(logits)
    lse = m + math.log(sum(math.exp(v - m) for v in logits))
    return -sum(float(t) * (lv - lse) for t, lv in zip(t_row, logits))


def test_weighting_with_an_unmasked_image():
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, generator=g)
    t = torch.softmax(torch.randn(4, 5, generator=g), -1)
    # image 0 has 3 masked patches (rows 0-2), image 1 none, image 2 one (row 3); 3 images in the denominator
    per_image = [sum(_ce(s[i], t[i], 0.1) for i in range(3)) / 3, 0.0, _ce(s[3], t[3], 0.1)]
    expected = sum(per_image) / 3
    assert float(ibot_loss(s, t, masks)) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(masked_patch_weights(masks), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    # precomputed weights (as the collate supplies) give the same value
    weighted = ibot_loss(s, t, masks, 0.1, weights=masked_patch_weights(masks))
    assert float(weighted) == pytest.approx(expected, rel=1e-5)


def test_all_patches_mode_is_mean_over_images_of_patch_means():
    masks = torch.ones(2, 3, dtype=torch.bool)
    s = torch.randn(6, 4)
    t = torch.softmax(torch.randn(6, 4), -1)
    per_patch = torch.tensor([_ce(s[i], t[i], 0.2) for i in range(6)])
    expected = per_patch.reshape(2, 3).mean(1).mean()
    assert float(ibot_loss(s, t, masks, 0.2)) == pytest.approx(float(expected), rel=1e-5)


def test_gradients_and_extreme_values():
    masks = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    s = (torch.randn(3, 8) * 1e4).bfloat16().requires_grad_()
    t = torch.softmax(torch.randn(3, 8) * 1e4, -1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ibot_loss(s, t, masks)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad.float()).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_bad_inputs():
    masks = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="mark 2 patches"):
        ibot_loss(torch.randn(3, 4), torch.rand(3, 4), masks)
    with pytest.raises(ValueError, match="bool"):
        ibot_loss(torch.randn(2, 4), torch.rand(2, 4), masks.int())
    with pytest.raises(ValueError, match="same"):
        ibot_loss(torch.randn(2, 4), torch.rand(2, 5), masks)


def test_batch_without_masked_patch_gives_zero_and_empty_targets_work():
    from pretrain.losses import SoftmaxCenter, sinkhorn_knopp

    s = torch.zeros(0, 8, requires_grad=True)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    targets = sinkhorn_knopp(torch.zeros(0, 8), 0.07)
    assert targets.shape == (0, 8)
    loss = ibot_loss(s, targets, masks)
    loss.backward()
    assert float(loss.detach()) == 0.0 and s.grad.shape == (0, 8)
    center = SoftmaxCenter(8)
    center.update(torch.zeros(0, 8))
    assert torch.equal(center.center, torch.zeros(1, 8))
