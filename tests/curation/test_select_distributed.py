"""The distributed balanced sample and retrieval: per-cluster quota thresholds against water-filling, the cluster
stage's balanced parts against ``balanced_sample``, kNN and cluster retrieval and the selection against the
single-process functions over the whole pool, on synthetic runs of many small parts; resume after a kill and the
per-task row bound."""

from __future__ import annotations

import hashlib
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from curation import schemas
from curation.config import RunConfig
from curation.index import balanced_sample, retrieve_by_cluster, retrieve_knn, waterfill
from curation.index.config import IndexConfig
from curation.io.artifacts import load_assignments, load_centroids, load_embeddings, load_kept
from curation.io.fs import read_json, read_parquet, write_json, write_parquet
from curation.io.parts import part_name
from curation.stages import LocalExecutor, run_stages
from curation.stages import quota as quota_mod
from curation.stages.base import Stage
from curation.stages.dedupe import DedupeStage
from curation.stages.embed import EmbedStage
from curation.stages.quota import LeafKeys, quota_thresholds
from curation.stages.retrieve import SeedEmbedStage, SeedIngestStage, seed_prefix
from pretrain.utils.config import load_config

from .conftest import DyingExecutor, Killed

DIM = 24
GROUPS = (300, 160, 80, 40, 20)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_embeddings(root: str, uids: list[str], x: np.ndarray, rows_per_part: int) -> int:
    n_parts = max(1, -(-len(uids) // rows_per_part))
    for p in range(n_parts):
        s, e = p * rows_per_part, min(len(uids), (p + 1) * rows_per_part)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[s:e].ravel(), pa.float32()), DIM)
        write_parquet(f"{root}/embeddings/{part_name(p)}",
                      pa.table({"uid": uids[s:e], "emb": emb}, schema=schemas.embeddings(DIM, "float32")))
    return n_parts


def hashed_run(run: str, cfg: RunConfig, rows_per_part: int, seed: int = 0) -> None:
    """Embed + dedupe outputs (as those stages lay them out) of a pool in unequal groups, sha1 uids, every 25th
    image a dropped duplicate; and every seed set of ``cfg`` embedded (near the groups 0, 2 and 4)."""
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0][: len(GROUPS)]
    group = rng.permutation(np.repeat(np.arange(len(GROUPS)), GROUPS))
    x = _unit(centers[group] + 0.25 * rng.normal(size=(len(group), DIM)))
    uids = [hashlib.sha1(f"{seed}-{i}".encode()).hexdigest() for i in range(len(group))]
    n_parts = _write_embeddings(run, uids, x, rows_per_part)
    keep = np.arange(len(uids)) % 25 != 3
    for p in range(n_parts):
        s, e = p * rows_per_part, min(len(uids), (p + 1) * rows_per_part)
        n = e - s
        write_parquet(f"{run}/dedup/{part_name(p)}", pa.table({
            "uid": uids[s:e], "component": pa.array(np.arange(s, e), pa.int64()), "keep": pa.array(keep[s:e]),
            "nearest_uid": pa.nulls(n, pa.string()), "score": pa.array(np.zeros(n, np.float32)),
            "contaminated": pa.array(np.zeros(n, bool))}, schema=schemas.DEDUP))  # fmt: skip
    write_json(f"{run}/embeddings/_SUCCESS.json", {"embedding_parts": n_parts, "dim": DIM,
                                                   "config_hash": EmbedStage(cfg, run).config_hash})
    write_json(f"{run}/dedup/_SUCCESS.json", {"dedup_parts": n_parts, "out": int(keep.sum()),
                                              "config_hash": DedupeStage(cfg, run).config_hash})
    for k, s in enumerate(cfg.retrieve.seeds):
        prefix = seed_prefix(s.name)
        g = rng.choice([0, 2, 4], size=12 + 9 * k)
        su = [hashlib.sha1(f"seed-{s.name}-{i}".encode()).hexdigest() for i in range(len(g))]
        sp = _write_embeddings(f"{run}/{prefix}", su, _unit(centers[g] + 0.3 * rng.normal(size=(len(g), DIM))), 7)
        write_json(f"{run}/{prefix}/manifest/_SUCCESS.json",
                   {"config_hash": SeedIngestStage(cfg, run, prefix).config_hash})
        write_json(f"{run}/{prefix}/embeddings/_SUCCESS.json", {"embedding_parts": sp, "dim": DIM,
                   "config_hash": SeedEmbedStage(cfg, run, prefix).config_hash})  # fmt: skip


def _cfg(*overrides: str, seeds: str = "[]") -> RunConfig:
    return load_config(RunConfig, None, [
        'stages=["cluster", "retrieve"]', "seed=11", "cluster.threads=1", f"retrieve.seeds={seeds}",
        'cluster.levels=[{n_clusters=12, init="kmeans++"}, {n_clusters=4, init="kmeans++"}]', *overrides])  # fmt: skip


def _parts(run: str, subdir: str, n: int) -> pa.Table:
    return pa.concat_tables([read_parquet(f"{run}/{subdir}/{part_name(i)}") for i in range(n)])




# ------------------------------------------------------------------ quota thresholds


class _Steps(Stage):
    name = "steps"
    output = "steps"

    def config_sections(self) -> tuple[Any, ...]:
        return ()

    def run(self, executor):  # pragma: no cover - only run_parts is used
        return {}


@pytest.mark.parametrize("strategy", ["random", "closest"])
@pytest.mark.parametrize("bins", [3, 256])
def test_quota_thresholds_pick_the_waterfill_leaves(tmp_path, monkeypatch, strategy, bins):
    """Many tied distances (a bracket narrows to one key value and goes on over the leaf index), empty and full
    clusters, parts of very different sizes: the picks are those of water-filling over the whole pool."""
    monkeypatch.setattr(quota_mod, "MAX_BINS", bins)
    rng = np.random.default_rng(bins)
    sizes = [0, 1, 7, 40, 3, 0, 120, 15]
    urls, offsets, l1s, dists = [], [0], [], []
    for p, m in enumerate(sizes):
        l1 = rng.choice(6, size=m, p=[0.5, 0.2, 0.1, 0.1, 0.1, 0.0])
        dist = rng.integers(0, 4, m) / 8.0  # few distinct values: ties everywhere
        url = str(tmp_path / part_name(p))
        write_parquet(url, pa.table({"l1": pa.array(l1, pa.int32()), "dist": pa.array(dist, pa.float32())}))
        urls.append(url)
        offsets.append(offsets[-1] + m)
        l1s.append(l1)
        dists.append(dist)
    l1, dist = np.concatenate(l1s), np.concatenate(dists)
    counts = np.bincount(l1, minlength=7)
    quota = counts * 2 // 3
    quota[1], quota[4] = counts[1], 0  # one full cluster, one with no picks; 5 and 6 are empty
    skip = 17
    r = np.random.default_rng(5)
    r.random(skip)
    tie = dist.astype(np.float64) if strategy == "closest" else r.random(len(l1))
    expect = np.flatnonzero(waterfill(l1, np.ones(len(l1), np.int64), quota, tie))
    stage = _Steps(RunConfig(), str(tmp_path / "run"))
    keys = LeafKeys(urls, offsets, strategy, 5, skip)
    th = quota_thresholds(stage, LocalExecutor(), "q", keys, counts, quota)
    got = np.concatenate([np.flatnonzero(th.picked(*keys.read(p)[1:])) + offsets[p] for p in range(len(urls))])
    assert np.array_equal(got, expect)
    rounds = stage.store.done("q-final", stage.config_hash)[0]["rounds"]
    assert rounds >= (4 if bins == 3 else 1)
    again = quota_thresholds(stage, LocalExecutor(), "q", keys, counts, quota)  # from the final marker
    assert np.array_equal(again.key, th.key) and np.array_equal(again.leaf, th.leaf)


# ------------------------------------------------------------------ balanced sample


@pytest.mark.parametrize("strategy", ["random", "closest"])
@pytest.mark.parametrize("levels,target,bins", [(1, 100, 256), (2, 100, 3), (2, 351, 256), (1, 10_000, 256)])
def test_balanced_parts_equal_balanced_sample(tmp_path, monkeypatch, strategy, levels, target, bins):
    monkeypatch.setattr(quota_mod, "MAX_BINS", bins)
    lv = ['cluster.levels=[{n_clusters=12, init="kmeans++"}]'] if levels == 1 else []
    cfg = _cfg(*lv, f"cluster.target_size={target}", f'cluster.strategy="{strategy}"', "cluster.rows_per_part=40",
               'stages=["cluster"]')  # fmt: skip
    run = str(tmp_path / "run")
    hashed_run(run, cfg, rows_per_part=37)
    rec = run_stages(cfg, run, LocalExecutor())["cluster"]
    a = load_assignments(run)
    _, parents = load_centroids(run, levels)
    l1, dist = np.asarray(a["l1"], np.int64), np.asarray(a["dist"], np.float64)
    ref = balanced_sample([l1, *parents], target, strategy=strategy, seed=11,
                          distances=dist if strategy == "closest" else None)  # fmt: skip
    uids = np.array(a["uid"].to_pylist())
    order = np.argsort(uids[ref])
    got = _parts(run, "clusters/balanced", rec["balanced_parts"])
    assert got["uid"].to_pylist() == uids[ref][order].tolist()  # the same picks, sorted by uid across parts
    np.testing.assert_array_equal(np.asarray(got["score"]), (1.0 - dist[ref][order]).astype(np.float32))
    assert rec["balanced"] == len(ref) == min(target, len(l1)) and rec["balanced_parts"] == -(-len(ref) // 40)
    sizes = read_json(f"{run}/clusters/sizes.json")
    assert sizes["level1_after"] == np.bincount(l1[ref], minlength=12).tolist()
    assert sizes["level1_before"] == np.bincount(l1, minlength=12).tolist()


# ------------------------------------------------------------------ retrieval (references: the stage before issue 12)


def _reference_knn(run: str, cfg: RunConfig, s: Any) -> list[dict[str, Any]]:
    pool_uids, pool = load_kept(run)
    seed_uids, seeds, _ = load_embeddings(run, seed_prefix(s.name))
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    si, pi, sc = retrieve_knn(pool, seeds, min(s.n_per_seed, len(pool_uids)), IndexConfig(kind="flat"),
                              min_score=None if s.min_score <= -1.0 else s.min_score)  # fmt: skip
    starts = np.r_[0, np.flatnonzero(np.diff(si)) + 1]
    rank = np.arange(len(si)) - np.repeat(starts, np.diff(np.r_[starts, len(si)]))
    from curation.stages.retrieve_steps import cap_knn

    keep = cap_knn(pi, sc, s.cap)
    return [{"seed_set": s.name, "seed_uid": seed_uids[a], "uid": pool_uids[b], "score": float(c), "reason": "knn",
             "rank": int(r)} for a, b, c, r in zip(si[keep], pi[keep], sc[keep], rank[keep])]  # fmt: skip


def _reference_cluster(run: str, cfg: RunConfig, s: Any) -> list[dict[str, Any]]:
    from curation.index import assign

    pool_uids, pool = load_kept(run)
    a = load_assignments(run)
    assert a["uid"].to_pylist() == pool_uids
    l1, dist = np.asarray(a["l1"], np.int64), np.asarray(a["dist"], np.float64)
    seed_uids, seeds, _ = load_embeddings(run, seed_prefix(s.name))
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    cents, _ = load_centroids(run, len(cfg.cluster.levels))
    seed_l1, _ = assign(seeds, cents[0])
    picked = retrieve_by_cluster(l1, seed_l1, s.m_per_cluster, s.min_seeds_per_cluster, s.cap or None, cfg.seed,
                                 pool_dist=dist if s.pick == "closest" else None)  # fmt: skip
    out = []
    for i in picked:
        seeds_c = np.flatnonzero(seed_l1 == l1[i])
        sims = pool[i] @ seeds[seeds_c].T
        out.append({"seed_set": s.name, "seed_uid": seed_uids[seeds_c[np.argmax(sims)]], "uid": pool_uids[i],
                    "score": float(sims.max()), "reason": "cluster", "rank": int(l1[i])})  # fmt: skip
    return out


def _reference_selection(pairs: list[dict[str, Any]], balanced: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[str, tuple] = {}
    n_seeds: dict[str, int] = {}
    for p in pairs:
        n_seeds[p["uid"]] = n_seeds.get(p["uid"], 0) + 1
        key = ({"knn": 0, "cluster": 1}[p["reason"]], -p["score"], p["seed_set"], p["seed_uid"])
        best[p["uid"]] = min(best.get(p["uid"], key), key)
    rows = [{"uid": u, "reason": ("knn", "cluster")[k[0]], "seed_set": k[2], "seed_uid": k[3], "score": -k[1],
             "n_seeds": n_seeds[u]} for u, k in best.items()]  # fmt: skip
    rows += [r for r in balanced if r["uid"] not in best]
    return sorted(rows, key=lambda r: r["uid"])


def _same_rows(got: list[dict[str, Any]], expect: list[dict[str, Any]]) -> None:
    assert len(got) == len(expect)
    for g, e in zip(got, expect):
        assert {k: v for k, v in g.items() if k != "score"} == {k: v for k, v in e.items() if k != "score"}
        assert g["score"] == pytest.approx(e["score"], abs=2e-6)


SEEDS = ('[{name="near", sources=["/none"], method="knn", n_per_seed=6, cap=CAP}, '
         '{name="few", sources=["/none"], method="cluster", min_seeds_per_cluster=1, m_per_cluster=45, '
         'pick="PICK", cap=CAP}, {name="far", sources=["/none"], method="knn", n_per_seed=4, min_score=0.5}]')


@pytest.mark.parametrize("pick,cap,target", [("random", 0, 120), ("closest", 40, 120), ("random", 40, 0)])
def test_retrieval_and_selection_equal_the_single_process_functions(tmp_path, monkeypatch, pick, cap, target):
    monkeypatch.setattr(quota_mod, "MAX_BINS", 4)  # several threshold rounds
    seeds = SEEDS.replace("CAP", str(cap)).replace("PICK", pick)
    cfg = _cfg(f"cluster.target_size={target}", "retrieve.rows_per_part=50", "cluster.rows_per_part=30",
               seeds=seeds)  # fmt: skip
    run = str(tmp_path / "run")
    hashed_run(run, cfg, rows_per_part=43)
    rec = run_stages(cfg, run, LocalExecutor())["retrieve"]
    pairs = _parts(run, "retrieval", rec["retrieval_parts"]).to_pylist()
    by_set = {s.name: [p for p in pairs if p["seed_set"] == s.name] for s in cfg.retrieve.seeds}
    expect = {}
    for s in cfg.retrieve.seeds:
        expect[s.name] = (_reference_knn if s.method == "knn" else _reference_cluster)(run, cfg, s)
        key = (lambda p: (p["seed_uid"], p["rank"])) if s.method == "knn" else (lambda p: p["uid"])
        _same_rows(sorted(by_set[s.name], key=key), sorted(expect[s.name], key=key))
        assert rec["seed_sets"][s.name]["pairs"] == len(expect[s.name])
        assert rec["seed_sets"][s.name]["retrieved"] == len({p["uid"] for p in expect[s.name]})
    assert rec["seed_sets"]["near"]["collided"] > 0
    if cap:  # the cap binds both sets
        assert rec["seed_sets"]["few"]["retrieved"] == rec["seed_sets"]["near"]["retrieved"] == cap
    balanced = []
    if target:
        crec = read_json(f"{run}/clusters/_SUCCESS.json")
        balanced = _parts(run, "clusters/balanced", crec["balanced_parts"]).to_pylist()
    sel = _parts(run, "selection", rec["selection_parts"]).to_pylist()
    _same_rows(sel, _reference_selection([p for s in cfg.retrieve.seeds for p in expect[s.name]], balanced))
    assert rec["selection_parts"] == rec["retrieval_parts"] > 1 and rec["out"] == len(sel)


def test_one_bucket_keeps_the_single_process_pair_order(tmp_path):
    """With one uid bucket, ``retrieval/part-00000`` holds the pairs in the order the single-process stage wrote
    them: seed set by seed set, kNN seed-major by rank, cluster picks by pool position."""
    cfg = _cfg("cluster.target_size=50", seeds=SEEDS.replace("CAP", "0").replace("PICK", "random"))
    run = str(tmp_path / "run")
    hashed_run(run, cfg, rows_per_part=53)
    rec = run_stages(cfg, run, LocalExecutor())["retrieve"]
    assert rec["retrieval_parts"] == rec["selection_parts"] == 1
    got = read_parquet(f"{run}/retrieval/part-00000.parquet").to_pylist()
    expect = [p for s in cfg.retrieve.seeds
              for p in (_reference_knn if s.method == "knn" else _reference_cluster)(run, cfg, s)]  # fmt: skip
    _same_rows(got, expect)


# ------------------------------------------------------------------ resume and the row bound


KILL_CFG = ("cluster.target_size=150", "cluster.rows_per_part=40", "retrieve.rows_per_part=60")
KILL_SEEDS = SEEDS.replace("CAP", "40").replace("PICK", "random")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A synthetic run before the cluster stage, and a copy run to the end without interruption."""
    root = tmp_path_factory.mktemp("resume")
    cfg = _cfg(*KILL_CFG, seeds=KILL_SEEDS)
    hashed_run(str(root / "base"), cfg, rows_per_part=31)
    shutil.copytree(root / "base", root / "ref")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(quota_mod, "MAX_BINS", 3)
        run_stages(cfg, str(root / "ref"), LocalExecutor())
    return root, cfg


@pytest.mark.parametrize("step,after", [("balance-r1", 2), ("pick", 3), ("quota-few-r1", 1), ("search-near", 4),
                                        ("select", 1)])  # fmt: skip
def test_killed_run_resumes_to_identical_outputs(finished, tmp_path, monkeypatch, step, after):
    monkeypatch.setattr(quota_mod, "MAX_BINS", 3)
    root, cfg = finished
    run, ref = str(tmp_path / "run"), str(root / "ref")
    shutil.copytree(root / "base", run)
    with pytest.raises(Killed):
        run_stages(cfg, run, DyingExecutor(step, after))
    recs = run_stages(cfg, run, LocalExecutor())
    assert recs["cluster" if step in ("balance-r1", "pick") else "retrieve"]["parts_skipped"] >= after
    crec, rrec = read_json(f"{run}/clusters/_SUCCESS.json"), read_json(f"{run}/selection/_SUCCESS.json")
    for subdir, n in (("clusters/balanced", crec["balanced_parts"]), ("retrieval", rrec["retrieval_parts"]),
                      ("selection", rrec["selection_parts"])):  # fmt: skip
        assert _parts(run, subdir, n).equals(_parts(ref, subdir, n)), subdir


def test_no_task_reads_more_than_its_part_or_bucket(tmp_path, monkeypatch):
    """The memory contract, counted in rows: a task reads one embedding or assignment part, or one uid bucket
    (planned at ``rows_per_part``; sha1 uids spread evenly: 50% slack), never the pool."""
    monkeypatch.setattr(quota_mod, "MAX_BINS", 4)
    cfg = _cfg("cluster.target_size=300", "cluster.rows_per_part=60", "retrieve.rows_per_part=80",
               seeds=SEEDS.replace("CAP", "0").replace("PICK", "closest"))  # fmt: skip
    run = str(tmp_path / "run")
    hashed_run(run, cfg, rows_per_part=41)
    run_stages(cfg, run, LocalExecutor())
    from curation.io.parts import PartStore

    for stage, bounds in (("cluster", {"assign": 41, "pick": 41, "balanced": 60}),
                          ("retrieve", {"search-near": 41, "pick-few": 41, "select": 80})):  # fmt: skip
        store = PartStore(run, stage, "x")
        h = read_json(f"{run}/{'clusters' if stage == 'cluster' else 'selection'}/_SUCCESS.json")["config_hash"]
        steps = [d.name for d in (tmp_path / "run" / "_work" / stage).iterdir()]
        rounds = [s for s in steps if "-r" in s and not s.endswith("final")]
        assert rounds, steps
        for step in [*bounds, *rounds]:
            rows = [int(m["in"]) for m in store.done(step, h).values()]
            bound = bounds.get(step, 41)
            assert rows and max(rows) <= bound * (1.5 if step in ("balanced", "select") else 1), (stage, step, rows)
        assert not [p for p in (tmp_path / "run" / "_work" / stage).rglob("*") if p.suffix in (".npz", ".parquet")]
