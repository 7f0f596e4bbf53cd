"""Cluster stage outputs on separable synthetic embeddings: assignments at every level, determinism, balancing."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from curation import schemas
from curation.config import RunConfig
from curation.io.artifacts import load_assignments, load_centroids
from curation.io.fs import read_json, read_parquet, write_json, write_parquet
from curation.stages import LocalExecutor, run_stages
from curation.stages.dedupe import DedupeStage
from curation.stages.embed import EmbedStage
from pretrain.utils.config import load_config

GROUP_SIZES = (400, 200, 100, 50, 25)
DIM = 32


def synthetic_run(run_dir: str, cfg: RunConfig, n_parts: int = 3, seed: int = 0) -> dict[str, int]:
    """Write a finished embed + dedupe (as those stages lay them out) over 5 well-separated groups of very
    unequal size; every 40th image is a dropped duplicate. Returns ``{uid: group}`` of the kept images."""
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0][: len(GROUP_SIZES)]
    groups = np.repeat(np.arange(len(GROUP_SIZES)), GROUP_SIZES)
    x = centers[groups] + 0.08 * rng.normal(size=(len(groups), DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    order = rng.permutation(len(groups))
    uids = [f"{i:040x}" for i in range(len(groups))]
    keep = np.arange(len(groups)) % 40 != 7
    chunks = np.array_split(order, n_parts)
    for p, idx in enumerate(chunks):
        values = pa.array(x[idx].reshape(-1), pa.float32())
        emb = pa.Table.from_arrays([pa.array([uids[i] for i in idx]), pa.FixedSizeListArray.from_arrays(values, DIM)],
                                   schema=schemas.embeddings(DIM, "float32"))  # fmt: skip
        write_parquet(f"{run_dir}/embeddings/part-{p:05d}.parquet", emb)
        n = len(idx)
        dedup = pa.table({"uid": [uids[i] for i in idx], "component": pa.array(idx, pa.int64()),
                          "keep": pa.array(keep[idx]), "nearest_uid": pa.nulls(n, pa.string()),
                          "score": pa.array(np.zeros(n, np.float32)), "contaminated": pa.array(np.zeros(n, bool))},
                         schema=schemas.DEDUP)  # fmt: skip
        write_parquet(f"{run_dir}/dedup/part-{p:05d}.parquet", dedup)
    write_json(f"{run_dir}/embeddings/_SUCCESS.json", {"embedding_parts": n_parts, "dim": DIM,
               "config_hash": EmbedStage(cfg, run_dir).config_hash})  # fmt: skip
    write_json(f"{run_dir}/dedup/_SUCCESS.json", {"dedup_parts": n_parts,
               "config_hash": DedupeStage(cfg, run_dir).config_hash})  # fmt: skip
    return {uids[i]: int(groups[i]) for i in range(len(groups)) if keep[i]}


FLAT = ["cluster.levels=[{n_clusters=5, init=\"kmeans++\", niter=20}]"]
HIER = ["cluster.levels=[{n_clusters=20, n_resampling_steps=3, sample_size=6, init=\"kmeans++\"}, "
        "{n_clusters=5, init=\"kmeans++\", nredo=3}]"]  # fmt: skip


def _cfg(*overrides: str) -> RunConfig:
    return load_config(RunConfig, None, ["stages=[\"cluster\"]", *overrides])


def _purity(labels: np.ndarray, groups: np.ndarray) -> float:
    """Fraction of items in the majority group of their cluster, and every group in one cluster."""
    ok = 0
    for c in np.unique(labels):
        ok += np.bincount(groups[labels == c]).max()
    return ok / len(labels)


@pytest.mark.parametrize("levels", [FLAT, HIER], ids=["flat", "hierarchical"])
def test_every_kept_uid_assigned_at_every_level_and_groups_recovered(tmp_path, levels):
    cfg = _cfg(*levels)
    run = str(tmp_path / "run")
    truth = synthetic_run(run, cfg)
    rec = run_stages(cfg, run, LocalExecutor())["cluster"]
    n_levels = len(cfg.cluster.levels)
    assert rec["out"] == rec["in"] == len(truth) and rec["assign_parts"] == 3
    table = load_assignments(run)
    assert sorted(table["uid"].to_pylist()) == sorted(truth)  # only kept uids, each exactly once
    assert table.column_names == ["uid"] + [f"l{k}" for k in range(1, n_levels + 1)] + ["dist"]
    cents, parents = load_centroids(run, n_levels)
    assert [c.shape for c in cents] == [(lv.n_clusters, DIM) for lv in cfg.cluster.levels]
    groups = np.array([truth[u] for u in table["uid"].to_pylist()])
    top = np.asarray(table[f"l{n_levels}"])
    assert _purity(top, groups) == 1.0 and len(np.unique(top)) == 5  # the 5 groups are the 5 top clusters
    l1 = np.asarray(table["l1"])
    for k in range(1, n_levels):  # parents chain: l_{k+1} = parent_k[l_k]
        assert np.array_equal(parents[k - 1][np.asarray(table[f"l{k}"])], np.asarray(table[f"l{k + 1}"]))
    x = np.concatenate([np.stack(read_parquet(f"{run}/embeddings/part-{p:05d}.parquet")["emb"].to_pylist())
                        for p in range(3)])  # fmt: skip
    uids = sum((read_parquet(f"{run}/embeddings/part-{p:05d}.parquet")["uid"].to_pylist() for p in range(3)), [])
    row = {u: i for i, u in enumerate(uids)}
    xs = x[[row[u] for u in table["uid"].to_pylist()]]
    sims = xs @ cents[0].T
    assert np.array_equal(np.argmax(sims, axis=1), l1)  # nearest level-1 centroid
    np.testing.assert_allclose(np.asarray(table["dist"]), 1 - sims.max(axis=1), atol=1e-5)
    assert read_json(f"{run}/clusters/sizes.json")["level1_after"] is None


def test_deterministic_under_seed(tmp_path):
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        cfg = _cfg(*HIER, f"seed={seed}", "cluster.train_points=300")
        run = str(tmp_path / name)
        synthetic_run(run, cfg)
        run_stages(cfg, run, LocalExecutor())
        files = {}
        for root, _, names in os.walk(f"{run}/clusters"):
            for n in names:
                if n.endswith((".npy", ".parquet")):
                    with open(os.path.join(root, n), "rb") as f:
                        files[os.path.relpath(os.path.join(root, n), run)] = f.read()
        outs.append(files)
    assert outs[0] == outs[1] and len(outs[0]) == 3 + 3  # 2 centroid files, 1 parent map, 3 assign parts
    assert outs[0] != outs[2]
    assert read_json(f"{tmp_path}/a/clusters/_SUCCESS.json")["train_points"] == 300


@pytest.mark.parametrize("strategy", ["random", "closest"])
def test_balanced_sampling_meets_target_and_flattens_sizes(tmp_path, strategy):
    cfg = _cfg(*HIER, "cluster.target_size=100", f'cluster.strategy="{strategy}"')
    run = str(tmp_path / "run")
    truth = synthetic_run(run, cfg)
    rec = run_stages(cfg, run, LocalExecutor())["cluster"]
    sel = read_parquet(f"{run}/clusters/balanced/part-00000.parquet")
    uids = sel["uid"].to_pylist()
    assert len(uids) == len(set(uids)) == 100 == rec["balanced"]
    assert set(sel["reason"].to_pylist()) == {"balanced"} and set(uids) <= set(truth)
    per_group = np.bincount([truth[u] for u in uids], minlength=5)
    assert per_group.tolist() == [20] * 5  # water-filling over the 5 top clusters (smallest holds >= 20)
    before = np.bincount(list(truth.values()))
    assert before.max() / before.min() > 15 and rec["size_ratio_after"] < rec["size_ratio_before"]
    sizes = read_json(f"{run}/clusters/sizes.json")
    assert sum(sizes["level1_after"]) == 100 and sum(sizes["level1_before"]) == len(truth)
    if strategy == "closest":  # within each level-1 cluster the picks are its closest members
        a = load_assignments(run)
        l1, dist, au = np.asarray(a["l1"]), np.asarray(a["dist"]), a["uid"].to_pylist()
        chosen = np.isin(au, uids)
        for c in np.unique(l1[chosen]):
            inside = l1 == c
            assert dist[inside & chosen].max() <= dist[inside & ~chosen].min() + 1e-7 if (inside & ~chosen).any() \
                else True  # fmt: skip


def test_too_many_clusters_is_a_clear_error(tmp_path):
    cfg = _cfg("cluster.levels=[{n_clusters=5000}]")
    run = str(tmp_path / "run")
    synthetic_run(run, cfg)
    with pytest.raises(ValueError, match=r"cluster.levels\[0\].n_clusters=5000"):
        run_stages(cfg, run, LocalExecutor())
    with pytest.raises(ValueError, match=r"cluster.levels\[1\].n_clusters"):
        _cfg("cluster.levels=[{n_clusters=5}, {n_clusters=10}]")
