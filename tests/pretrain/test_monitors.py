"""Collapse monitors on healthy, collapsed and hand-computed inputs."""

import math

import pytest
import torch

from pretrain.ssl.monitors import (
    collapse_metrics,
    effective_rank,
    embedding_std,
    kl_teacher_student,
    teacher_entropy,
    teacher_marginal_entropy,
)


def test_teacher_entropy_limits():
    k = 16
    uniform = torch.full((8, k), 1 / k)
    assert teacher_entropy(uniform) == pytest.approx(math.log(k), rel=1e-6)
    one_hot = torch.eye(k)[:8]
    assert teacher_entropy(one_hot) == pytest.approx(0.0, abs=1e-6)
    assert teacher_marginal_entropy(one_hot) == pytest.approx(math.log(8), rel=1e-6)  # 8 distinct prototypes used
    same = torch.eye(k)[[3] * 8]
    assert teacher_marginal_entropy(same) == pytest.approx(0.0, abs=1e-6)  # one prototype for all: collapse
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert teacher_entropy(p) == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


def test_kl_teacher_student():
    logits = torch.randn(5, 7)
    assert kl_teacher_student(torch.softmax(logits / 0.1, -1), logits, 0.1) == pytest.approx(0.0, abs=1e-5)
    t = torch.tensor([[0.75, 0.25]])
    s = torch.tensor([[0.0, 0.0]])  # student uniform
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_teacher_student(t, s, 0.1) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="rows must match"):
        kl_teacher_student(t, torch.zeros(2, 2))


def test_embedding_std_healthy_and_collapsed():
    g = torch.Generator().manual_seed(0)
    healthy = torch.randn(4096, 64, generator=g)
    assert embedding_std(healthy) == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = torch.randn(1, 64, generator=g).expand(32, 64) + 1e-6 * torch.randn(32, 64, generator=g)
    assert embedding_std(collapsed) < 1e-5


def test_effective_rank():
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0, rel=1e-6)
    rank_one = torch.randn(20, 1) @ torch.randn(1, 10)
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-3)
    two_dirs = torch.cat([torch.eye(6)[:2] * 3, torch.eye(6)[:2] * 3])  # two equal singular values
    assert effective_rank(two_dirs) == pytest.approx(2.0, rel=1e-6)
    assert effective_rank(torch.zeros(4, 3)) == 1.0


def test_collapse_metrics_keys_and_floats():
    t = torch.softmax(torch.randn(8, 10), -1)
    out = collapse_metrics(teacher_probs=t, student_logits=torch.randn(8, 10), embeddings=torch.randn(8, 4))
    assert set(out) == {"teacher_entropy", "teacher_marginal_entropy", "kl_teacher_student", "embedding_std",
                        "effective_rank"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert collapse_metrics(embeddings=torch.randn(4, 4)).keys() == {"embedding_std", "effective_rank"}
