"""Copy detection (planted near-duplicates, threshold semantics, keep policy, score norm) and decontamination."""

from collections import deque

import numpy as np
import pytest

from curation.index import IndexConfig, background_bias, copy_detect, decontaminate


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _planted(n_orig: int, n_groups: int, d: int, seed: int):
    """Random originals (pairwise cos ~ N(0, 1/d)) plus 1-3 noisy copies (cos >= ~0.9) of ``n_groups`` of them."""
    rng = np.random.default_rng(seed)
    orig = _unit(rng.standard_normal((n_orig, d)))
    rows, group = [orig], list(range(n_orig))
    for g in rng.choice(n_orig, n_groups, replace=False):
        n_copies = int(rng.integers(1, 4))
        rows.append(_unit(orig[g] + 0.35 * rng.standard_normal((n_copies, d)) / np.sqrt(d)))
        group += [int(g)] * n_copies
    x = np.concatenate(rows)
    perm = rng.permutation(len(x))
    return x[perm], np.asarray(group)[perm]


def _bfs(adj: np.ndarray) -> np.ndarray:
    n = len(adj)
    label = np.full(n, -1)
    for s in range(n):
        if label[s] >= 0:
            continue
        label[s] = s
        q = deque([s])
        while q:
            u = q.popleft()
            for v in np.flatnonzero(adj[u]):
                if label[v] < 0:
                    label[v] = s
                    q.append(v)
    return label


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_planted_groups_found_exactly(kind):
    x, group = _planted(3000, 300, 256, seed=0)
    res = copy_detect(x, k=16, threshold=0.6, index=IndexConfig(kind=kind, nprobe=16))
    # precision = recall = 1: components are exactly the planted groups
    assert _same_partition(res.component, group)
    assert res.n_components == 3000
    n = len(x)
    assert res.component.dtype == np.int64 and res.keep.dtype == bool and res.score.dtype == np.float32
    assert np.all(res.component == np.array([np.flatnonzero(res.component == c).min() for c in res.component]))
    assert np.all(res.component <= np.arange(n))
    alone = np.bincount(res.component, minlength=n)[res.component] == 1
    np.testing.assert_array_equal(res.nearest == -1, alone)
    dup = ~alone
    assert np.all(res.component[res.nearest[dup]] == res.component[dup])
    assert np.all(res.score[dup] > 0.6) and np.all(res.score[alone] <= 0.6)
    sims = x[dup] @ x[res.nearest[dup]].T
    np.testing.assert_allclose(res.score[dup], np.diag(sims), atol=1e-5)
    # default keep policy: the lowest index of every component
    np.testing.assert_array_equal(res.keep, res.component == np.arange(n))


def test_threshold_is_strict():
    d = 8
    a = np.zeros((1, d), np.float32)
    a[0, 0] = 1.0
    b = np.zeros((1, d), np.float32)
    b[0, 0], b[0, 1] = 0.5, np.sqrt(0.75)
    x = np.concatenate([a, b])  # cosine exactly 0.5
    at = copy_detect(x, k=1, threshold=0.5)
    assert at.n_components == 2 and np.all(at.nearest == -1)
    np.testing.assert_allclose(at.score, [0.5, 0.5], atol=1e-7)
    below = copy_detect(x, k=1, threshold=0.4999)
    assert below.n_components == 1 and list(below.nearest) == [1, 0] and list(below.keep) == [True, False]


def test_keep_policy_priority_then_lowest_index():
    x, group = _planted(200, 40, 128, seed=1)
    prio = np.random.default_rng(2).integers(0, 3, len(x)).astype(float)  # many ties
    res = copy_detect(x, k=8, threshold=0.6, priority=prio)
    assert _same_partition(res.component, group)
    for c in np.unique(res.component):
        members = np.flatnonzero(res.component == c)
        best = members[prio[members] == prio[members].max()].min()
        assert res.keep[members].sum() == 1 and res.keep[best]
    with pytest.raises(ValueError, match="priority"):
        copy_detect(x, priority=np.ones(3))


def _at_cos(v: np.ndarray, c: float, rng) -> np.ndarray:
    w = rng.standard_normal(v.shape[1])
    w -= (w @ v[0]) * v[0]
    return (c * v + np.sqrt(1 - c**2) * w / np.linalg.norm(w)).astype(np.float32)


def test_score_normalisation_with_background():
    rng = np.random.default_rng(3)
    d = 64
    hub = _unit(rng.standard_normal((1, d)))
    # two pairs with the same raw similarity 0.8; pair A sits in a dense background region, pair B does not
    a0 = _unit(hub + 0.3 * rng.standard_normal((1, d)) / np.sqrt(d))
    b0 = _unit(rng.standard_normal((1, d)))
    x = _unit(np.concatenate([a0, _at_cos(a0, 0.8, rng), b0, _at_cos(b0, 0.8, rng)]))
    background = _unit(hub + 0.6 * rng.standard_normal((50, d)) / np.sqrt(d))
    bias = background_bias(x, background, 3)
    ref = np.sort(x @ background.T, axis=1)[:, ::-1][:, :3].mean(axis=1)
    np.testing.assert_allclose(bias, ref, atol=1e-5)
    s = x @ x.T
    res = copy_detect(x, k=3, threshold=0.3, background=background, beta=1.0)
    adjusted = s - 0.5 * (bias[:, None] + bias[None, :])
    np.fill_diagonal(adjusted, -np.inf)
    np.testing.assert_allclose(res.score, adjusted.max(axis=1), atol=1e-5)
    assert adjusted[0, 1] < 0.3 < adjusted[2, 3]  # the dense-region pair is no longer a copy, the other still is
    assert res.component[2] == res.component[3] and res.component[0] != res.component[1]
    assert list(res.nearest) == [-1, -1, 3, 2]
    assert copy_detect(x, k=3, threshold=0.3).component[1] == 0  # without normalisation A is a copy pair


def _decontam_brute(pool, refs, thr, pool_edges):
    n = len(pool)
    x = np.concatenate([pool, refs])
    adj = (x @ x.T) > thr
    np.fill_diagonal(adj, False)
    if not pool_edges:
        adj[:n, :n] = False
        adj[n:, n:] = False
    label = _bfs(adj)
    ref_labels = set(label[n:].tolist())
    return np.array([lab in ref_labels for lab in label[:n]])


@pytest.mark.parametrize("pool_edges", [True, False])
def test_decontaminate_drops_exactly_components_touching_refs(pool_edges):
    rng = np.random.default_rng(4)
    d = 128
    pool, group = _planted(400, 60, d, seed=5)
    refs = np.concatenate([
        _unit(pool[rng.choice(len(pool), 15, replace=False)] + 0.5 * rng.standard_normal((15, d)) / np.sqrt(d)),
        _unit(rng.standard_normal((10, d))),  # unrelated references
    ])
    res = decontaminate(pool, refs, k=len(pool) + len(refs), threshold=0.45, pool_edges=pool_edges)
    expected = _decontam_brute(pool, refs, 0.45, pool_edges)
    np.testing.assert_array_equal(res.drop, expected)
    assert 15 <= res.drop.sum() < len(pool)
    cross = pool @ refs.T
    pi, ri = np.nonzero(cross > 0.45)
    assert set(zip(res.pool_idx.tolist(), res.ref_idx.tolist())) == set(zip(pi.tolist(), ri.tolist()))
    np.testing.assert_allclose(res.score, cross[res.pool_idx, res.ref_idx], atol=1e-5)
    assert np.all(np.diff(res.pool_idx) >= 0)
    if pool_edges:  # whole planted groups go when one member matches a reference
        for g in np.unique(group[res.drop]):
            assert res.drop[group == g].all()
    else:
        np.testing.assert_array_equal(res.drop, (cross > 0.45).any(axis=1))


def test_decontaminate_default_k_and_empty_refs():
    pool, _ = _planted(300, 30, 64, seed=6)
    refs = pool[:5].copy()
    res = decontaminate(pool, refs)
    assert res.drop[:5].all()
    empty = decontaminate(pool, np.zeros((0, 64), np.float32))
    assert not empty.drop.any() and len(empty.pool_idx) == 0
    with pytest.raises(ValueError, match="dimension"):
        decontaminate(pool, _unit(np.ones((2, 32), np.float32)))


def test_pool_edges_chain_to_reference():
    rng = np.random.default_rng(7)
    d = 128
    ref = _unit(rng.standard_normal((1, d)))
    p1 = _at_cos(ref, 0.6, rng)
    p2 = _at_cos(p1, 0.6, rng)  # a copy of p1 but not of the reference itself
    others = _unit(rng.standard_normal((20, d)))
    pool = _unit(np.concatenate([others, p1, p2]))
    assert float((p2 @ ref.T)[0, 0]) < 0.45
    chained = decontaminate(pool, ref, k=8, threshold=0.45)
    direct = decontaminate(pool, ref, k=8, threshold=0.45, pool_edges=False)
    assert np.flatnonzero(chained.drop).tolist() == [20, 21]
    assert np.flatnonzero(direct.drop).tolist() == [20]
    assert chained.pool_idx.tolist() == [20] and chained.ref_idx.tolist() == [0]
    assert chained.score[0] == pytest.approx(0.6, abs=1e-5)


def test_similarity_join_equals_knn_then_threshold(monkeypatch):
    from curation.index import self_knn
    from curation.index.join import _Collector, similarity_join

    x, _ = _planted(1500, 300, 64, seed=8)
    k, thr = 3, 0.6
    sims, ids = self_knn(x, k, IndexConfig(kind="flat"))
    rows, cols = np.nonzero((ids >= 0) & (sims > thr))
    want = {(int(a), int(ids[a, c])) for a, c in zip(rows, cols)}
    g = similarity_join(x, k=k, threshold=thr, index=IndexConfig(kind="flat"), block=256)
    assert set(zip(g.src.tolist(), g.dst.tolist())) == want
    # with exact duplicates (tied scores) the neighbour ids may differ in ties, the per-row scores may not
    xd = np.concatenate([x, x[:40]])
    sd, idd = self_knn(xd, k, IndexConfig(kind="flat"))
    gd = similarity_join(xd, k=k, threshold=thr, index=IndexConfig(kind="flat"), block=256)
    w_src, w_score = np.nonzero(sd > thr)[0], sd[sd > thr]
    w_order, g_order = np.lexsort((w_score, w_src)), np.lexsort((gd.score, gd.src))
    np.testing.assert_array_equal(gd.src[g_order], w_src[w_order])
    np.testing.assert_allclose(gd.score[g_order], w_score[w_order], atol=1e-5)
    np.testing.assert_allclose(g.score, np.einsum("ij,ij->i", x[g.src], x[g.dst]), atol=1e-5)
    np.testing.assert_allclose(g.best, sims[:, 0], atol=1e-5)
    # intermediate top-k compaction (dense data, tiny buffer) gives the same graph
    monkeypatch.setattr(_Collector, "MAX_PENDING", 50)
    g2 = similarity_join(x, k=k, threshold=thr, index=IndexConfig(kind="flat"), block=128)
    assert set(zip(g2.src.tolist(), g2.dst.tolist())) == want
    # IVF join: same edges as exact on clustered data with near-duplicates
    gi = similarity_join(x, k=k, threshold=thr, index=IndexConfig(kind="ivf", nprobe=4))
    assert "IVF" in gi.plan
    got = set(zip(gi.src.tolist(), gi.dst.tolist()))
    assert len(got & want) / len(want) >= 0.95 and got <= want | got
    assert np.all(gi.score > thr)


@pytest.mark.parametrize("self_join", ["blas", "faiss"])
def test_graph_backends_agree(self_join):
    x, group = _planted(2000, 200, 128, seed=9)
    res = copy_detect(x, k=16, index=IndexConfig(kind="ivf", self_join=self_join))
    assert _same_partition(res.component, group)
    assert "components" in res.timings
