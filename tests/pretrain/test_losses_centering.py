"""Softmax centering: targets, EMA update by hand, padding, async flag, state_dict, no teacher gradient."""

import pytest
import torch

from pretrain.losses import SoftmaxCenter


def test_initial_targets_are_plain_softmax_and_fp32():
    center = SoftmaxCenter(5)
    logits = torch.randn(4, 5)
    torch.testing.assert_close(center.teacher_probs(logits, 0.04), torch.softmax(logits / 0.04, -1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = center.teacher_probs(logits.bfloat16(), 0.04)
    assert probs.dtype == torch.float32


def test_ema_update_matches_hand_computation():
    center = SoftmaxCenter(3, momentum=0.9)
    a = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    center.update(a)
    torch.testing.assert_close(center.center, torch.tensor([[0.2, 0.2, 0.2]]))  # 0.9 * 0 + 0.1 * [2, 2, 2]
    b = torch.tensor([[0.0, 10.0, 0.0]])
    center.update(b)
    expected = 0.9 * torch.tensor([[0.2, 0.2, 0.2]]) + 0.1 * torch.tensor([[0.0, 10.0, 0.0]])
    torch.testing.assert_close(center.center, expected)
    # the next targets use the updated center
    logits = torch.randn(2, 3)
    torch.testing.assert_close(center.teacher_probs(logits, 0.1), torch.softmax((logits - expected) / 0.1, -1))


def test_rows_past_n_samples_are_ignored_and_empty_batch_keeps_center():
    center = SoftmaxCenter(2, momentum=0.5)
    logits = torch.tensor([[2.0, 4.0], [4.0, 0.0], [1e6, -1e6]])
    center.update(logits, n_samples=2)
    torch.testing.assert_close(center.center, torch.tensor([[1.5, 1.0]]))
    center.update(logits, n_samples=torch.tensor(0))
    torch.testing.assert_close(center.center, torch.tensor([[1.5, 1.0]]))
    with pytest.raises(ValueError, match="n_samples"):
        center.update(logits, n_samples=4)


def test_async_flag_without_process_group_gives_same_numbers():
    sync, lagged = SoftmaxCenter(4), SoftmaxCenter(4)
    logits = torch.randn(3, 4)
    sync.update(logits)
    lagged.update(logits, async_op=True)  # applied at the next teacher_probs
    torch.testing.assert_close(lagged.teacher_probs(logits, 0.07), sync.teacher_probs(logits, 0.07))
    torch.testing.assert_close(lagged.center, sync.center)


def test_center_is_a_checkpointed_buffer_and_no_teacher_grad():
    center = SoftmaxCenter(3)
    logits = torch.randn(2, 3, requires_grad=True)
    center.update(logits)
    assert "center" in center.state_dict() and not center.center.requires_grad
    probs = center.teacher_probs(logits, 0.1)
    assert not probs.requires_grad
    restored = SoftmaxCenter(3)
    restored.load_state_dict(center.state_dict())
    torch.testing.assert_close(restored.center, center.center)


def test_patch_logits_3d_are_flattened():
    center = SoftmaxCenter(2, momentum=0.0)
    center.update(torch.tensor([[[1.0, 3.0], [3.0, 1.0]], [[0.0, 0.0], [4.0, 4.0]]]))
    torch.testing.assert_close(center.center, torch.tensor([[2.0, 2.0]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        SoftmaxCenter(3, momentum=1.0)
    with pytest.raises(ValueError, match="center size"):
        SoftmaxCenter(3).teacher_probs(torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError, match="temp"):
        SoftmaxCenter(3).teacher_probs(torch.randn(2, 3), 0.0)


def test_extreme_logits_finite():
    center = SoftmaxCenter(8)
    logits = (torch.randn(4, 8) * 1e4).bfloat16()
    center.update(logits)
    probs = center.teacher_probs(logits, 0.04)
    assert torch.isfinite(probs).all() and torch.isfinite(center.center).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
