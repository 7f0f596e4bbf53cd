"""Spherical and hierarchical k-means (determinism, separable data) and balanced hierarchical sampling."""

import numpy as np
import pytest

from curation.index import (
    LevelConfig,
    assign,
    balanced_sample,
    closest_per_cluster,
    cluster_sizes,
    hierarchical_kmeans,
    spherical_kmeans,
    waterfill,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _one_to_one(pred: np.ndarray, truth: np.ndarray) -> bool:
    """Purity 1 in both directions: the clustering equals the labelling up to renaming."""
    pairs = set(zip(pred.tolist(), truth.tolist()))
    return len(pairs) == len(set(pred.tolist())) == len(set(truth.tolist()))


def _hier_data(seed: int, n_super: int = 4, n_sub: int = 5, per: int = 60, d: int = 32):
    rng = np.random.default_rng(seed)
    supers = _unit(rng.standard_normal((n_super, d)))
    subs = _unit(np.repeat(supers, n_sub, axis=0) + 1.0 * _unit(rng.standard_normal((n_super * n_sub, d))))
    sub_label = np.repeat(np.arange(n_super * n_sub), per)
    x = _unit(subs[sub_label] + 0.08 * rng.standard_normal((len(sub_label), d)) / np.sqrt(d))
    return x, sub_label, sub_label // n_sub


def test_spherical_kmeans_separable_and_deterministic():
    x, sub, _ = _hier_data(0)
    c1 = spherical_kmeans(x, 20, niter=20, seed=3, init="kmeans++", nredo=3)
    c2 = spherical_kmeans(x, 20, niter=20, seed=3, init="kmeans++", nredo=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-5)
    labels, dist = assign(x, c1, batch=97)
    assert labels.dtype == np.int64 and dist.dtype == np.float32
    np.testing.assert_allclose(dist, 1.0 - np.max(x @ c1.T, axis=1), atol=1e-5)
    assert _one_to_one(labels, sub)
    # random init converges too (to a possibly different optimum), deterministically
    r1, r2 = (spherical_kmeans(x, 20, seed=4) for _ in range(2))
    np.testing.assert_array_equal(r1, r2)
    with pytest.raises(ValueError, match="at least k"):
        spherical_kmeans(x[:5], 10)
    with pytest.raises(ValueError, match="init"):
        spherical_kmeans(x, 3, init="furthest")


def test_hierarchical_kmeans_recovers_two_level_structure():
    x, sub, sup = _hier_data(1)
    levels = [LevelConfig(n_clusters=20, n_resampling_steps=2, sample_size=20, niter=25, init="kmeans++", nredo=3),
              LevelConfig(n_clusters=4, n_resampling_steps=1, sample_size=3, init="kmeans++", nredo=3)]
    res = hierarchical_kmeans(x, levels, seed=2)
    again = hierarchical_kmeans(x, levels, seed=2)
    for a, b in zip(res, again):
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.assignment, b.assignment)
        np.testing.assert_array_equal(a.distance, b.distance)
    assert [len(lvl.assignment) for lvl in res] == [len(x), 20]
    assert res[1].centroids.shape == (4, 32)
    l1 = res[0].assignment
    l2 = res[1].assignment[l1]  # level-2 cluster of every point
    assert _one_to_one(l1, sub)
    assert _one_to_one(l2, sup)
    with pytest.raises(ValueError, match="n_clusters"):
        hierarchical_kmeans(x, [LevelConfig(n_clusters=10), LevelConfig(n_clusters=11)])
    with pytest.raises(ValueError, match="sample_size"):
        LevelConfig(n_clusters=3, sample_size=0)


def test_resampling_flattens_centroid_density():
    rng = np.random.default_rng(0)
    d = 8
    pole = np.eye(d, dtype=np.float32)[0]
    dense = _unit(pole + 0.3 * rng.standard_normal((4000, d)) / np.sqrt(d))  # 80% of the data in a small cap
    x = np.concatenate([dense, _unit(rng.standard_normal((1000, d)))])
    in_dense = []
    for steps in (0, 10):
        lvl = hierarchical_kmeans(x, [LevelConfig(n_clusters=50, n_resampling_steps=steps, sample_size=10)], seed=0)
        in_dense.append(int(np.sum(lvl[0].centroids @ pole > 0.8)))
    assert in_dense[0] >= 20 and in_dense[1] <= in_dense[0] // 3, in_dense


def test_closest_per_cluster():
    labels = np.array([0, 1, 0, 0, 1, 2])
    dist = np.array([0.3, 0.1, 0.1, 0.2, 0.5, 0.9])
    np.testing.assert_array_equal(closest_per_cluster(labels, dist, 2), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(closest_per_cluster(labels, dist, 1), [1, 2, 5])


def test_waterfill_caps_and_exact_budget():
    group = np.array([0, 0, 0, 0, 1, 1, 2])
    sizes = np.array([10, 2, 5, 1, 3, 3, 0])
    alloc = waterfill(group, sizes, np.array([12, 5, 0]), np.arange(7, dtype=float))
    # group 0: cap x=4 -> min(x, s) = 4, 2, 4, 1 = 11; remainder 1 to the first tie key among sizes > 4 (item 0)
    np.testing.assert_array_equal(alloc, [5, 2, 4, 1, 3, 2, 0])
    with pytest.raises(ValueError, match="budget"):
        waterfill(group, sizes, np.array([19, 0, 0]), np.zeros(7))


def _imbalanced_hierarchy(seed: int):
    rng = np.random.default_rng(seed)
    leaf_sizes = np.array([2000, 900, 400, 150, 60, 30, 12, 6, 3, 40, 500, 25])
    l1 = np.repeat(np.arange(len(leaf_sizes)), leaf_sizes)
    l1 = l1[rng.permutation(len(l1))]
    l2 = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    return l1, l2, leaf_sizes


def test_balanced_sample_exact_size_balance_and_determinism():
    l1, l2, leaf_sizes = _imbalanced_hierarchy(0)
    target = 400
    sel = balanced_sample([l1, l2], target, seed=7)
    assert len(sel) == target and len(np.unique(sel)) == target and sel.dtype == np.int64
    np.testing.assert_array_equal(sel, balanced_sample([l1, l2], target, seed=7))
    assert not np.array_equal(sel, balanced_sample([l1, l2], target, seed=8))
    # top level: 4 groups of sizes 3350, 222, 21, 565 -> cap 126 except the group of 21 (all taken)
    per_top = np.bincount(l2[l1[sel]], minlength=4)
    assert per_top[2] == 21 and sorted(per_top[[0, 1, 3]].tolist()) == [126, 126, 127]
    # max/min ratio over leaf clusters vs a uniform random sample of the same size
    rng = np.random.default_rng(0)
    uniform = rng.choice(len(l1), target, replace=False)

    def ratio(idx):
        counts = np.bincount(l1[idx], minlength=12)
        return counts.max() / max(1, counts.min())

    assert np.min(np.bincount(l1[sel], minlength=12)) >= 3  # every cluster represented (smallest has 3)
    assert ratio(sel) < ratio(uniform) / 5
    sizes = cluster_sizes([l1, l2])
    np.testing.assert_array_equal(sizes[1], leaf_sizes)


def test_balanced_sample_closest_strategy_and_edge_cases():
    l1, l2, _ = _imbalanced_hierarchy(1)
    dist = np.random.default_rng(2).random(len(l1))
    sel = balanced_sample([l1, l2], 300, strategy="closest", distances=dist, seed=0)
    assert len(sel) == 300
    for c in np.unique(l1[sel]):  # within each leaf cluster the picks are its closest points
        members = np.flatnonzero(l1 == c)
        picked = np.intersect1d(members, sel)
        assert np.max(dist[picked]) <= np.min(np.setdiff1d(dist[members], dist[picked]), initial=np.inf)
    np.testing.assert_array_equal(balanced_sample([l1, l2], len(l1) + 5), np.arange(len(l1)))
    assert len(balanced_sample([l1], 17, seed=1)) == 17  # single level
    with pytest.raises(ValueError, match="distances"):
        balanced_sample([l1, l2], 10, strategy="closest")
    with pytest.raises(ValueError, match="level 1"):
        balanced_sample([l1, l2[:5]], 10)
