"""Seed retrieval: kNN retrieval equals brute force, cluster-based retrieval rules, collision statistics."""

import numpy as np
import pytest

from curation.index import IndexConfig, collision_counts, collision_stats, retrieve_by_cluster, retrieve_knn


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "auto"])
def test_retrieve_knn_equals_brute_force(kind):
    rng = np.random.default_rng(0)
    pool = _unit(rng.standard_normal((1500, 32)))
    seeds = _unit(rng.standard_normal((40, 32)))
    seed_idx, pool_idx, score = retrieve_knn(pool, seeds, 4, IndexConfig(kind=kind))
    sims = seeds.astype(np.float64) @ pool.T.astype(np.float64)
    top = np.argsort(-sims, axis=1)[:, :4]
    np.testing.assert_array_equal(seed_idx, np.repeat(np.arange(40), 4))
    np.testing.assert_array_equal(pool_idx, top.ravel())
    np.testing.assert_allclose(score, np.take_along_axis(sims, top, axis=1).ravel(), atol=1e-5)
    # a score floor keeps only pairs strictly above it
    floor = float(np.median(score))
    s2, p2, sc2 = retrieve_knn(pool, seeds, 4, min_score=floor)
    assert np.all(sc2 > floor) and len(sc2) == int(np.sum(score > floor))


def test_collisions():
    uniq, counts = collision_counts(np.array([5, 3, 5, 5, 9, 3]))
    np.testing.assert_array_equal(uniq, [3, 5, 9])
    np.testing.assert_array_equal(counts, [2, 3, 1])
    st = collision_stats(np.array([5, 3, 5, 5, 9, 3]))
    assert (st.n_pairs, st.n_unique, st.n_collided, st.max_count) == (6, 3, 2, 3)
    assert st.collision_rate == pytest.approx(0.5)
    assert collision_stats(np.zeros(0, dtype=np.int64)).collision_rate == 0.0


def test_retrieve_by_cluster_rules():
    rng = np.random.default_rng(1)
    pool_labels = rng.integers(0, 10, 5000)
    pool_labels[pool_labels == 9] = 8  # cluster 9 is empty in the pool
    seed_labels = np.array([0] * 5 + [1] * 4 + [2] * 3 + [3] * 1 + [9] * 7)
    got = retrieve_by_cluster(pool_labels, seed_labels, m_per_cluster=100, min_seeds_per_cluster=3, cap=None, seed=3)
    counts = np.bincount(pool_labels[got], minlength=10)
    # clusters with MORE than 3 seeds: 0 and 1 (and 9, which has no pool images)
    np.testing.assert_array_equal(counts, [100, 100, 0, 0, 0, 0, 0, 0, 0, 0])
    assert np.all(np.diff(got) > 0)
    np.testing.assert_array_equal(got, retrieve_by_cluster(pool_labels, seed_labels, 100, 3, None, seed=3))
    assert not np.array_equal(got, retrieve_by_cluster(pool_labels, seed_labels, 100, 3, None, seed=4))
    # small cluster: everything is taken
    small = retrieve_by_cluster(np.array([0, 0, 1, 1, 1]), np.array([0, 0]), 10, 1, None)
    np.testing.assert_array_equal(small, [0, 1])


def test_retrieve_by_cluster_cap_and_closest():
    pool_labels = np.repeat(np.arange(4), [1000, 1000, 30, 1000])
    seed_labels = np.repeat(np.arange(4), 5)
    capped = retrieve_by_cluster(pool_labels, seed_labels, m_per_cluster=500, min_seeds_per_cluster=3, cap=600)
    counts = np.bincount(pool_labels[capped], minlength=4)
    assert len(capped) == 600 and counts[2] == 30 and sorted(counts[[0, 1, 3]].tolist()) == [190, 190, 190]
    dist = np.random.default_rng(2).random(len(pool_labels))
    close = retrieve_by_cluster(pool_labels, seed_labels, 20, 3, None, pool_dist=dist)
    for c in range(4):
        members = np.flatnonzero(pool_labels == c)
        np.testing.assert_array_equal(close[pool_labels[close] == c], np.sort(members[np.argsort(dist[members])[:20]]))
    with pytest.raises(ValueError, match="pool_labels"):
        retrieve_by_cluster(np.array([0.5]), seed_labels, 1, 1, None)
    with pytest.raises(ValueError, match="pool_dist"):
        retrieve_by_cluster(pool_labels, seed_labels, 1, 1, None, pool_dist=np.ones(3))
