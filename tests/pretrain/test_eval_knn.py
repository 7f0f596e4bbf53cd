"""k-NN equals an independent brute-force computation (numpy loops), including ties and k > n_train."""

import math

import numpy as np
import pytest
import torch

from pretrain.eval.config import KnnConfig
from pretrain.eval.features import FeatureSet
from pretrain.eval.knn import knn_evaluate, knn_neighbors, knn_predict, topk_stable


def brute_force(train, train_labels, test, test_labels, k, T, num_classes):
    """Per query: rank train by (cosine desc, index asc), vote exp(sim/T) over the first min(k, n), rank classes by
    (score desc, class asc). Returns (neighbour indices, normalised scores, top-1 accuracy, top-5 accuracy)."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    k = min(k, len(train))
    all_idx, all_scores, hit1, hit5 = [], [], 0, 0
    for qi in range(len(test)):
        q = test[qi] / np.linalg.norm(test[qi])
        sims = []
        for ti in range(len(train)):
            t = train[ti] / np.linalg.norm(train[ti])
            sims.append((float(np.dot(q, t)), ti))
        ranked = sorted(sims, key=lambda st: (-st[0], st[1]))[:k]
        scores = [0.0] * num_classes
        for s, ti in ranked:
            scores[int(train_labels[ti])] += math.exp(s / T)
        total = sum(scores)
        scores = [s / total for s in scores]
        order = sorted(range(num_classes), key=lambda c: (-scores[c], c))
        hit1 += order[0] == test_labels[qi]
        hit5 += test_labels[qi] in order[:5]
        all_idx.append([ti for _, ti in ranked])
        all_scores.append(scores)
    return np.array(all_idx), np.array(all_scores), hit1 / len(test), hit5 / len(test)


def _fs(x, y):
    return FeatureSet(features=torch.as_tensor(x, dtype=torch.float32), labels=torch.as_tensor(y, dtype=torch.int64),
                      keys=[str(i) for i in range(len(y))], mode="cls", embed_dim=x.shape[1])


def test_matches_brute_force_on_random_features():
    rng = np.random.default_rng(0)
    n_classes = 7
    # Clustered features so accuracies are neither 0 nor 1.
    centres = rng.normal(size=(n_classes, 24))
    ytr, yte = rng.integers(0, n_classes, 157), rng.integers(0, n_classes, 61)
    xtr = centres[ytr] + 1.5 * rng.normal(size=(157, 24))
    xte = centres[yte] + 1.5 * rng.normal(size=(61, 24))
    cfg = KnnConfig(ks=[1, 10, 20, 100, 200], temperature=0.07, chunk_size=16)
    result = knn_evaluate(_fs(xtr, ytr), _fs(xte, yte), cfg, device="cpu")
    assert result.k_effective == [1, 10, 20, 100, 157]
    for i, k in enumerate(cfg.ks):
        idx, _, top1, top5 = brute_force(xtr, ytr, xte, yte, k, 0.07, n_classes)
        assert result.top1[i] == pytest.approx(top1, abs=1e-12)
        assert result.top5[i] == pytest.approx(top5, abs=1e-12)
        _, got_idx = knn_neighbors(torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32), k,
                                   chunk_size=16)
        np.testing.assert_array_equal(got_idx.numpy(), idx)
    assert 0.2 < result.top1[1] < 1.0 and result.top5[1] > result.top1[1]


def test_top5_predictions_equal_brute_force_ranking():
    rng = np.random.default_rng(1)
    xtr, xte = rng.normal(size=(80, 12)), rng.normal(size=(30, 12))
    ytr, yte = rng.integers(0, 9, 80), rng.integers(0, 9, 30)
    preds = knn_predict(torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr), torch.tensor(xte,
                        dtype=torch.float32), KnnConfig(ks=[20], chunk_size=7), num_classes=9, device="cpu")[20]
    _, scores, _, _ = brute_force(xtr, ytr, xte, yte, 20, 0.07, 9)
    expected = np.array([sorted(range(9), key=lambda c: (-s[c], c))[:5] for s in scores])
    np.testing.assert_array_equal(preds.numpy(), expected)


def test_exact_ties_break_by_lower_train_index():
    rng = np.random.default_rng(2)
    # 0/1 vectors with exactly four ones: norms are 2, cosines are exact multiples of 1/4 -> many exact ties.
    def quantised(n):
        x = np.zeros((n, 8))
        for row in x:
            row[rng.choice(8, 4, replace=False)] = 1.0
        return x
    xtr, xte = quantised(60), quantised(25)
    xtr[30:40] = xtr[0:10]  # exact duplicates too
    ytr, yte = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    for k in (1, 5, 13, 60, 100):
        idx, scores, top1, top5 = brute_force(xtr, ytr, xte, yte, k, 0.07, 4)
        sims, got = knn_neighbors(torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32), k,
                                  chunk_size=8)
        np.testing.assert_array_equal(got.numpy(), idx)
        assert got.shape == (25, min(k, 60))
        assert (sims.numpy() * 4 == np.round(sims.numpy() * 4)).all()  # the ties really are exact
        result = knn_evaluate(_fs(xtr, ytr), _fs(xte, yte), KnnConfig(ks=[k], chunk_size=8), device="cpu")
        assert result.top5 == [1.0]  # 4 classes: always within the top 5
        assert result.top1[0] == pytest.approx(top1, abs=1e-12)


def test_topk_stable_matches_sorted_reference_on_integer_ties():
    sim = torch.randint(0, 3, (40, 50)).float()
    for k in (1, 7, 49, 50):
        vals, idx = topk_stable(sim, k)
        for r in range(40):
            ref = sorted(range(50), key=lambda j: (-sim[r, j].item(), j))[:k]
            assert idx[r].tolist() == ref
            assert vals[r].tolist() == [sim[r, j].item() for j in ref]


def test_k_larger_than_train_uses_all_train_samples():
    rng = np.random.default_rng(3)
    xtr, xte = rng.normal(size=(5, 6)), rng.normal(size=(9, 6))
    ytr, yte = np.array([0, 1, 1, 2, 2]), rng.integers(0, 3, 9)
    result = knn_evaluate(_fs(xtr, ytr), _fs(xte, yte), KnnConfig(ks=[3, 10, 200]), device="cpu")
    assert result.k_effective == [3, 5, 5]
    _, _, top1_all, _ = brute_force(xtr, ytr, xte, yte, 5, 0.07, 3)
    assert result.top1[1] == result.top1[2] == pytest.approx(top1_all)
    assert result.to_dict()["results"][2] == {"k": 200, "k_effective": 5, "top1": result.top1[2], "top5": 1.0}


def test_equal_class_scores_rank_the_lower_class_first():
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([3, 1, 0])
    preds = knn_predict(train, labels, torch.tensor([[1.0, 0.0]]), KnnConfig(ks=[2, 3]), num_classes=4,
                        device="cpu")
    assert preds[2][0].tolist() == [1, 3, 0, 2]  # classes 1 and 3 tie; zero-score classes follow by index
    assert preds[3][0].tolist()[:2] == [1, 3]


def test_temperature_changes_weighting():
    # One very close neighbour of class 0 against two farther ones of class 1: a low temperature lets the close
    # one win, a high temperature approaches majority voting.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    sharp = knn_predict(train, labels, q, KnnConfig(ks=[3], temperature=0.07), 2, "cpu")[3]
    flat = knn_predict(train, labels, q, KnnConfig(ks=[3], temperature=10.0), 2, "cpu")[3]
    assert sharp[0, 0].item() == 0 and flat[0, 0].item() == 1


@pytest.mark.parametrize("kwargs, field", [({"ks": []}, "ks"), ({"ks": [0]}, "ks"), ({"temperature": 0}, "temperature"),
                                           ({"chunk_size": 0}, "chunk_size")])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KnnConfig(**kwargs)
