"""Retrieve stage on real photos: exact kNN against brute force, cluster-based retrieval, collisions, the
union with the balanced sample, and shards built from the selection."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from curation.config import RunConfig
from curation.io.artifacts import load_assignments, load_centroids, load_embeddings, load_kept
from curation.io.fs import read_json, read_parquet
from curation.stages import LocalExecutor, run_stages
from pretrain.utils.config import load_config

from .conftest import jpeg_bytes, make_copy, photos

SEEDED = (0, 1, 2, 3, 16, 20)  # photos with seed copies (several copies each, so seeds collide)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    rng = random.Random(0)
    (root / "pool").mkdir()
    (root / "seeds").mkdir()
    for name, im in photos(160):
        (root / "pool" / f"{name}.jpg").write_bytes(jpeg_bytes(im))
    for i in SEEDED:
        name, im = photos(160)[i]
        for c in range(3):
            (root / "seeds" / f"{name}_{c}.jpg").write_bytes(make_copy(im, rng)[0])
    run = root / "base"
    cfg = _cfg(root)
    run_stages(cfg, str(run), LocalExecutor(), ["ingest", "embed", "dedupe"])
    return root, run


def _cfg(root, *overrides: str, method: str = "knn") -> RunConfig:
    seeds = f'[{{name="copies", sources=["{root / "seeds"}"], method="{method}", n_per_seed=3, ' \
            'min_seeds_per_cluster=2, m_per_cluster=1000}]'  # fmt: skip
    return load_config(
        RunConfig,
        "curation/recipes/default.toml",
        [f'ingest.sources=["{root / "pool"}"]', "embed.batch_size=16", f"retrieve.seeds={seeds}",
         "cluster.levels=[{n_clusters=4, init=\"kmeans++\"}]", *overrides],
    )  # fmt: skip


def _fresh(corpus, tmp_path, name):
    root, run = corpus
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return root, str(dst)


def test_knn_retrieval_is_exact_and_collisions_are_reported(corpus, tmp_path):
    root, run = _fresh(corpus, tmp_path, "knn")
    rec = run_stages(_cfg(root), run, LocalExecutor(), ["retrieve"])["retrieve"]
    pool_uids, pool = load_kept(run)
    seed_uids, seeds, _ = load_embeddings(run, "seeds/copies")
    assert len(seed_uids) == 3 * len(SEEDED) and len(pool_uids) == 27
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    sims = seeds @ pool.T  # brute force
    pairs = read_parquet(f"{run}/retrieval/part-00000.parquet").to_pylist()
    assert len(pairs) == 3 * len(seed_uids)
    for s, su in enumerate(seed_uids):
        mine = sorted((p for p in pairs if p["seed_uid"] == su), key=lambda p: p["rank"])
        expect = np.argsort(-sims[s], kind="stable")[:3]
        assert [p["uid"] for p in mine] == [pool_uids[j] for j in expect]
        np.testing.assert_allclose([p["score"] for p in mine], sims[s, expect], atol=1e-4)
        assert {p["reason"] for p in mine} == {"knn"}
    stats = rec["seed_sets"]["copies"]
    retrieved = {p["uid"] for p in pairs}
    assert stats["pairs"] == len(pairs) and stats["retrieved"] == len(retrieved)
    assert stats["collided"] > 0 and stats["max_seeds_per_image"] >= 3  # copies of one photo share neighbours
    counts = {u: sum(p["uid"] == u for p in pairs) for u in retrieved}
    assert stats["top_collisions"][0][1] == max(counts.values())
    sel = read_parquet(f"{run}/selection/part-00000.parquet").to_pylist()
    assert [r["uid"] for r in sel] == sorted(retrieved) and rec["out"] == len(sel)
    for r in sel:  # best seed per selected image, and its collision count
        best = max((p for p in pairs if p["uid"] == r["uid"]), key=lambda p: p["score"])
        assert r["seed_uid"] == best["seed_uid"] and r["n_seeds"] == counts[r["uid"]] and r["reason"] == "knn"
    # the nearest pool image of every seed is the photo it was copied from
    names = {u: n for n, u in _pool_names(run).items()}
    top1 = [p for p in pairs if p["rank"] == 0]
    origin = {su: n.rsplit("_", 1)[0] for su, n in _seed_names(run).items()}
    assert all(names[p["uid"]] == origin[p["seed_uid"]] for p in top1)


def _pool_names(run: str) -> dict[str, str]:
    t = read_parquet(f"{run}/manifest/part-00000.parquet")
    return {u.rsplit("/", 1)[1][:-4]: uid for u, uid in zip(t["uri"].to_pylist(), t["uid"].to_pylist())}


def _seed_names(run: str) -> dict[str, str]:
    t = read_parquet(f"{run}/seeds/copies/manifest/part-00000.parquet")
    return {uid: u.rsplit("/", 1)[1][:-4] for u, uid in zip(t["uri"].to_pylist(), t["uid"].to_pylist())}


def test_cluster_retrieval_union_with_balanced_and_shards(corpus, tmp_path):
    root, run = _fresh(corpus, tmp_path, "cluster")
    cfg = _cfg(root, "cluster.target_size=6", 'stages=["cluster", "retrieve", "shard"]', method="cluster")
    recs = run_stages(cfg, run, LocalExecutor())
    a = load_assignments(run)
    l1 = np.asarray(a["l1"])
    cents, _ = load_centroids(run, 1)
    _, seeds, _ = load_embeddings(run, "seeds/copies")
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    seed_l1 = np.argmax(seeds @ cents[0].T, axis=1)
    hot = [c for c in range(4) if (seed_l1 == c).sum() > 2]
    assert hot  # some cluster holds more than 2 seeds
    expect = {u for u, c in zip(a["uid"].to_pylist(), l1) if c in hot}
    pairs = read_parquet(f"{run}/retrieval/part-00000.parquet").to_pylist()
    assert {p["uid"] for p in pairs} == expect and {p["reason"] for p in pairs} == {"cluster"}
    balanced = set(read_parquet(f"{run}/clusters/balanced/part-00000.parquet")["uid"].to_pylist())
    sel = read_parquet(f"{run}/selection/part-00000.parquet").to_pylist()
    assert {r["uid"] for r in sel} == expect | balanced
    assert all(r["reason"] == ("cluster" if r["uid"] in expect else "balanced") for r in sel)
    assert recs["retrieve"]["reasons"] == {"cluster": len(expect), "balanced": len(balanced - expect)}
    # shards hold exactly the selection, each sample with its retrieval lineage
    assert recs["shard"]["selection"] == "selection" and recs["shard"]["out"] == len(sel)
    import webdataset as wds

    idx = read_json(f"{run}/shards/index.json")
    metas = [json.loads(s["json"]) for s in wds.WebDataset(f"{run}/shards/{idx['pattern']}", shardshuffle=False)]
    by_uid = {r["uid"]: r for r in sel}
    assert sorted(m["uid"] for m in metas) == sorted(by_uid)
    for m in metas:
        assert m["selection"]["reason"] == by_uid[m["uid"]]["reason"]
        assert m["selection"]["seed_uid"] == by_uid[m["uid"]]["seed_uid"]
        assert m["clusters"]["l1"] == int(l1[a["uid"].to_pylist().index(m["uid"])])


def test_retrieve_needs_cluster_for_cluster_method(corpus, tmp_path):
    root, run = _fresh(corpus, tmp_path, "nocluster")
    with pytest.raises(ValueError, match="cluster stage finished first"):
        run_stages(_cfg(root, method="cluster"), run, LocalExecutor(), ["retrieve"])
    with pytest.raises(ValueError, match="retrieve.seeds is empty"):
        run_stages(_cfg(root, "retrieve.seeds=[]"), run, LocalExecutor(), ["retrieve"])
