"""kNN search: exact vs brute force, IVF vs exact on clustered data, IVF-PQ refine, index choice rule."""

import numpy as np
import pytest

from curation.index import IndexConfig, knn_search, plan_index, self_knn


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, d: int, n_centers: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((n_centers, d)))
    pts = centers[rng.integers(0, n_centers, n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return _unit(pts)


def _brute(base, queries, k):
    sims = queries.astype(np.float64) @ base.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def test_flat_equals_brute_force():
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((700, 48)))
    queries = _unit(rng.standard_normal((90, 48)))
    sims, ids = knn_search(base, queries, 7, IndexConfig(kind="flat", query_batch=32))
    ref_s, ref_i = _brute(base, queries, 7)
    assert sims.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (90, 7)
    np.testing.assert_array_equal(ids, ref_i)
    np.testing.assert_allclose(sims, ref_s, atol=1e-5)


def test_padding_when_k_exceeds_base():
    rng = np.random.default_rng(1)
    base = _unit(rng.standard_normal((3, 8)))
    sims, ids = knn_search(base, base, 5)
    np.testing.assert_array_equal(ids[:, 3:], -1)
    assert np.all(np.isneginf(sims[:, 3:]))
    np.testing.assert_array_equal(np.sort(ids[:, :3], axis=1), np.tile([0, 1, 2], (3, 1)))


def test_self_knn_drops_self_even_with_exact_duplicates():
    rng = np.random.default_rng(2)
    x = _unit(rng.standard_normal((50, 16)))
    x[10] = x[11] = x[12]  # identical vectors: faiss may rank any of them first
    sims, ids = self_knn(x, 4, IndexConfig(kind="flat"))
    assert not np.any(ids == np.arange(50)[:, None])
    assert set(ids[10, :2]) == {11, 12} and set(ids[12, :2]) == {10, 11}
    ref_s, ref_i = _brute(x, x, 5)
    np.testing.assert_array_equal(ids[:10], ref_i[:10, 1:])


def test_ivf_agrees_with_flat_on_clustered_data():
    x = _clustered(12_000, 64, 40, 1.2, seed=3)
    k = 10
    cfg = IndexConfig(kind="ivf", nprobe=8)
    plan = plan_index(len(x), 64, cfg)
    assert plan.kind == "ivfflat" and plan.nlist == 12_000 // 39  # clamped by min_points_per_list
    s_ivf, i_ivf = self_knn(x, k, cfg)
    s_flat, i_flat = self_knn(x, k, IndexConfig(kind="flat"))
    thr = np.quantile(s_flat[:, 0], 0.5)  # edges above the median nearest-neighbour similarity
    exact = {(a, b) for a, b in zip(*np.nonzero(s_flat > thr)) for b in [i_flat[a, b]]}
    approx = {(a, b) for a, b in zip(*np.nonzero(s_ivf > thr)) for b in [i_ivf[a, b]]}
    assert len(exact) > 1000
    recall = len(exact & approx) / len(exact)
    assert recall >= 0.95, recall
    assert approx <= exact | approx and all(s > thr for s in s_ivf[s_ivf > thr])
    # IVFFlat scores are exact inner products
    rows = np.arange(len(x))[:, None]
    np.testing.assert_allclose(s_ivf[i_ivf >= 0], np.einsum("qkd,qd->qk", x[i_ivf], x)[i_ivf >= 0], atol=1e-5)
    assert np.all(i_ivf[rows[:, 0] == 0] != 0)


def test_ivfpq_with_exact_refine():
    x = _clustered(6_000, 64, 40, 1.2, seed=4)
    cfg = IndexConfig(kind="ivf", memory_budget_gb=1e-4, nprobe=16, refine_factor=8, pq_nbits=6)
    plan = plan_index(len(x), 64, cfg)
    assert plan.kind == "ivfpq" and plan.pq_m == 8
    q = x[:500]
    s_pq, i_pq = knn_search(x, q, 5, cfg)
    s_ex, i_ex = _brute(x, q, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i_pq, i_ex)])
    assert recall >= 0.9, recall
    # refined scores are exact cosine similarities, sorted descending
    np.testing.assert_allclose(s_pq, np.einsum("qkd,qd->qk", x[i_pq], q), atol=1e-5)
    assert np.all(np.diff(s_pq, axis=1) <= 1e-7)


def test_plan_rule():
    cfg = IndexConfig()
    assert plan_index(50_000, 384, cfg).kind == "flat"
    big = plan_index(1_000_000, 384, cfg)
    assert big.kind == "ivfflat" and big.nlist == 4096 and big.n_train == min(4096 * 50, cfg.train_max)
    assert plan_index(1_000_000, 384, IndexConfig(memory_budget_gb=1.0)).kind == "ivfpq"
    assert plan_index(100_000, 384, cfg).nlist == 1024  # 4*sqrt(1e5)=1265 -> 1024
    assert plan_index(2_000, 16, IndexConfig(kind="ivf")).nlist == 2000 // 39


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"kind": "hnsw"}, "kind"),
        ({"nprobe": 0}, "nprobe"),
        ({"memory_budget_gb": 0}, "memory_budget_gb"),
        ({"nlist": -3}, "nlist"),
        ({"use_gpu": "yes"}, "use_gpu"),
    ],
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        IndexConfig(**kwargs)


def test_bad_inputs():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="L2-normalised"):
        knn_search(x, x, 2)
    u = _unit(x)
    with pytest.raises(ValueError, match="dimension"):
        knn_search(u, _unit(rng.standard_normal((3, 5))), 2)
    with pytest.raises(ValueError, match="k must"):
        knn_search(u, u, 0)
    bad = u.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        knn_search(bad, u, 1)
