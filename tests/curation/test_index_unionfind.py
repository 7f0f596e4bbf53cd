"""Vectorised union-find against breadth-first search on random graphs."""

from collections import deque

import numpy as np
import pytest

from curation.index import component_sizes, connected_components


def _bfs_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    adj = [[] for _ in range(n)]
    for a, b in zip(src.tolist(), dst.tolist()):
        adj[a].append(b)
        adj[b].append(a)
    label = np.full(n, -1, dtype=np.int64)
    for start in range(n):  # ascending start => label = smallest member
        if label[start] >= 0:
            continue
        label[start] = start
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for nb in adj[node]:
                if label[nb] < 0:
                    label[nb] = start
                    queue.append(nb)
    return label


@pytest.mark.parametrize("n,m", [(1, 0), (10, 3), (200, 50), (500, 400), (2000, 1900), (3000, 6000)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_bfs_on_random_graphs(n, m, seed):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, n, m)
    dst = rng.integers(0, n, m)
    got = connected_components(n, src, dst)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _bfs_components(n, src, dst))


def test_adversarial_orders_path_and_star():
    n = 4097
    perm = np.random.default_rng(3).permutation(n)  # a long path with scrambled labels
    got = connected_components(n, perm[:-1], perm[1:])
    np.testing.assert_array_equal(got, np.zeros(n, dtype=np.int64))
    alt = np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])  # alternating low/high labels along a path
    np.testing.assert_array_equal(connected_components(n, alt[:-1], alt[1:]), np.zeros(n, dtype=np.int64))
    star = connected_components(10, np.full(8, 9), np.arange(1, 9))  # centre has the largest label, 0 isolated
    np.testing.assert_array_equal(star, [0] + [1] * 9)
    np.testing.assert_array_equal(component_sizes(star), [1] + [9] * 9)


def test_self_loops_duplicates_and_isolated_nodes():
    got = connected_components(6, np.array([2, 2, 4, 4, 5]), np.array([2, 4, 2, 4, 3]))
    np.testing.assert_array_equal(got, [0, 1, 2, 3, 2, 3])


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="endpoints"):
        connected_components(3, np.array([0]), np.array([3]))
    with pytest.raises(ValueError, match="same length"):
        connected_components(3, np.array([0, 1]), np.array([1]))
    with pytest.raises(ValueError, match="non-negative"):
        connected_components(-1, np.array([]), np.array([]))
