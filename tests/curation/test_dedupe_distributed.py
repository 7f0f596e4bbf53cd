"""The distributed dedupe: its pieces (bucketed shuffles, block joins, star contraction) against single-process
references, and the whole stage against ``copy_detect`` on synthetic runs (exact plan: identical; IVF plan:
bounded difference), with resume after a kill and the per-task memory bound."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation import schemas
from curation.config import RunConfig
from curation.index.blockjoin import join_blocks, merge_best, top_k_edges
from curation.index.config import IndexConfig
from curation.index.dedup import copy_detect
from curation.index.join import similarity_join
from curation.index.stars import large_star, small_star, star_labels, undirected_rows, unstable_nodes
from curation.index.unionfind import connected_components
from curation.io.buckets import bucket_of_ranges, read_bucket, write_buckets
from curation.io.fs import read_json, read_parquet, write_json, write_parquet
from curation.io.parts import part_name
from curation.stages import EmbedStage, IngestStage, LocalExecutor
from curation.stages.dedupe import DedupeStage

from .conftest import DyingExecutor, Killed


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n: int, d: int, seed: int, dup_frac: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around n/200 centres (cos ~0.3 inside a cluster) plus noisy copies (cos ~0.9); group ids."""
    rng = np.random.default_rng(seed)
    n_copy = int(n * dup_frac)
    n_orig = n - n_copy
    centres = _unit(rng.standard_normal((max(4, n // 200), d)))
    x = _unit(centres[rng.integers(0, len(centres), n_orig)] + rng.standard_normal((n_orig, d)) * 1.5 / np.sqrt(d))
    src = rng.integers(0, n_orig, n_copy)
    copies = _unit(x[src] + rng.standard_normal((n_copy, d)) * 0.45 / np.sqrt(d))
    group = np.r_[np.arange(n_orig), src]
    perm = rng.permutation(n)
    return np.concatenate([x, copies])[perm], group[perm]


def synthetic_run(run: str, x: np.ndarray, rows_per_part: int, config: RunConfig | None = None,
                  seed: int = 0) -> list[str]:  # fmt: skip
    """A run directory holding what ingest and embed would have written for vectors ``x`` (float16 storage)."""
    n, d = x.shape
    rng = np.random.default_rng(seed)
    uids = [f"{i:040x}" for i in range(n)]
    n_parts = -(-n // rows_per_part)
    for p in range(n_parts):
        s, e = p * rows_per_part, min(n, (p + 1) * rows_per_part)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[s:e].astype(np.float16).ravel(), pa.float16()), d)
        write_parquet(f"{run}/embeddings/{part_name(p)}", pa.table({"uid": uids[s:e], "emb": emb},
                                                                   schema=schemas.embeddings(d, "float16")))
        m = e - s
        side = rng.integers(50, 60, m).astype(np.int32)  # few distinct areas: keep-policy ties are exercised
        write_parquet(f"{run}/manifest/{part_name(p)}", pa.table({
            "uid": uids[s:e], "uris": [[f"/p/{u}.jpg"] for u in uids[s:e]], "uri": [f"/p/{u}.jpg" for u in uids[s:e]],
            "container": pa.nulls(m, pa.string()), "offset": np.full(m, -1), "size": np.full(m, 1000),
            "width": side, "height": side, "format": ["JPEG"] * m, "mode": ["RGB"] * m,
            "n_frames": np.ones(m, np.int32)}, schema=schemas.MANIFEST))  # fmt: skip
    config = config or RunConfig()
    write_json(f"{run}/embeddings/_SUCCESS.json", {"embedding_parts": n_parts, "dim": d,
                                                   "config_hash": EmbedStage(config, run).config_hash})
    write_json(f"{run}/manifest/_SUCCESS.json", {"manifest_parts": n_parts,
                                                 "config_hash": IngestStage(config, run).config_hash})
    return uids


def _stored(run: str) -> tuple[np.ndarray, np.ndarray]:
    """The vectors as the stage reads them (float16 storage) and the keep priorities (areas)."""
    rec = read_json(f"{run}/embeddings/_SUCCESS.json")
    mats, area = [], []
    for p in range(rec["embedding_parts"]):
        t = read_parquet(f"{run}/embeddings/{part_name(p)}")
        mats.append(np.asarray(t["emb"].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                               np.float32).reshape(t.num_rows, rec["dim"]))
        m = read_parquet(f"{run}/manifest/{part_name(p)}")
        area.append(np.asarray(m["width"].to_numpy(), np.float64) * m["height"].to_numpy())
    return np.concatenate(mats), np.concatenate(area)


def _dedup(run: str) -> pa.Table:
    rec = read_json(f"{run}/dedup/_SUCCESS.json")
    return pa.concat_tables([read_parquet(f"{run}/dedup/{part_name(p)}") for p in range(rec["dedup_parts"])])


def _config(*overrides: tuple[str, object]) -> RunConfig:
    """A run config in the single-threshold mode (synthetic vectors have no images to verify)."""
    cfg = RunConfig()
    cfg.dedupe.verify = False
    for key, value in overrides:
        obj = cfg.dedupe
        *path, leaf = key.split(".")
        for name in path:
            obj = getattr(obj, name)
        setattr(obj, leaf, value)
    cfg.dedupe.__post_init__()
    return cfg


def _pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    out = set()
    order = np.argsort(labels, kind="stable")
    lab = labels[order]
    for s, e in zip(*(lambda st: (st, np.r_[st[1:], len(lab)]))(np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]))):
        members = np.sort(order[s:e])
        out |= {(int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1:]}
    return out


# ------------------------------------------------------------------ pieces


def test_bucketed_shuffle_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    urls = []
    expected: dict[int, list[int]] = {b: [] for b in range(5)}
    for m in range(3):
        vals = rng.integers(0, 1000, 40)
        bucket = bucket_of_ranges(vals, np.array([0, 100, 300, 600, 601]))
        url = str(tmp_path / f"map{m}.parquet")
        counts = write_buckets(url, pa.table({"v": pa.array(vals, pa.int64())}), bucket, 5)
        assert counts == np.bincount(bucket, minlength=5).tolist()
        urls.append(url)
        for b in range(5):
            expected[b] += vals[bucket == b].tolist()  # file order, then row order
    for b in range(5):
        got = read_bucket(urls, b, pa.schema([("v", pa.int64())]))["v"].to_pylist()
        assert got == expected[b]
    with pytest.raises(ValueError, match="bucket numbers"):
        write_buckets(str(tmp_path / "bad.parquet"), pa.table({"v": [1]}), np.array([5]), 5)


@pytest.mark.parametrize("seed", range(6))
def test_star_contraction_equals_union_find(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 2000))
    if seed % 2:  # one long path in random order: the worst case for label propagation
        perm = rng.permutation(n)
        a, b = perm[:-1], perm[1:]
    else:
        e = int(rng.integers(0, 2 * n))
        a, b = rng.integers(0, n, e), rng.integers(0, n, e)
    starts = np.unique(np.r_[0, rng.integers(0, n, int(rng.integers(0, 6)))])
    u, v = undirected_rows(a, b)
    rounds = 0

    def buckets(u, v):
        b = bucket_of_ranges(u, starts)
        return [(u[b == k], v[b == k]) for k in range(len(starts))]

    while sum(unstable_nodes(*uv) for uv in buckets(u, v)):
        op = large_star if rounds % 2 == 0 else small_star
        outs = [op(*uv) for uv in buckets(u, v)]
        u, v = undirected_rows(np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]))
        rounds += 1
        assert rounds < 60
    labels = np.arange(n)
    nodes, lab = star_labels(u, v)
    labels[nodes] = lab
    assert np.array_equal(labels, connected_components(n, a, b))


def test_block_joins_merge_to_the_single_process_join():
    x, _ = planted(900, 32, seed=1)
    ref = similarity_join(x, k=5, threshold=0.5, index=IndexConfig(kind="flat"))
    tiles = [(0, 250), (250, 600), (600, 900)]
    parts = []
    for i, (a0, a1) in enumerate(tiles):
        for b0, b1 in tiles[i:]:
            ga = np.arange(a0, a1)
            if (a0, a1) == (b0, b1):
                parts.append(join_blocks(x[a0:a1], ga, k=5, threshold=0.5))
            else:
                parts.append(join_blocks(x[a0:a1], ga, x[b0:b1], np.arange(b0, b1), k=5, threshold=0.5))
    ids, best, partner = merge_best(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "best",
                                                                                               "partner")))
    assert np.array_equal(ids, np.arange(900)) and np.array_equal(partner, ref.partner)
    np.testing.assert_allclose(best, ref.best, atol=1e-6)
    src, dst, score = top_k_edges(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("src", "dst", "score")),
                                  5)
    assert set(zip(src.tolist(), dst.tolist())) == set(zip(ref.src.tolist(), ref.dst.tolist()))
    assert np.bincount(src, minlength=900).max() <= 5


# ------------------------------------------------------------------ the stage


@pytest.mark.parametrize("rows_per_part,block_rows", [(37, 65_536), (37, 300), (500, 800)])
def test_exact_plan_equals_copy_detect(tmp_path, rows_per_part, block_rows):
    x, _ = planted(1500, 48, seed=2)
    run = str(tmp_path / "run")
    uids = synthetic_run(run, x, rows_per_part)
    cfg = _config(("block_rows", block_rows), ("k", 8), ("threshold", 0.7))
    rec = DedupeStage(cfg, run).execute(LocalExecutor())
    stored, area = _stored(run)
    ref = copy_detect(stored, k=8, threshold=0.7, priority=area, index=IndexConfig(kind="flat"))
    got = _dedup(run)
    assert got["uid"].to_pylist() == uids
    assert np.array_equal(got["component"].to_numpy(), ref.component)
    assert np.array_equal(got["keep"].to_numpy(zero_copy_only=False), ref.keep)
    assert got["nearest_uid"].to_pylist() == [uids[j] if j >= 0 else None for j in ref.nearest]
    np.testing.assert_allclose(got["score"].to_numpy(), ref.score, atol=1e-6)
    assert rec["plan"] == "exact" and rec["edge_recall"] == 1.0 and rec["recall_exact_edges"] > 20
    assert rec["in"] == 1500 and rec["out"] == int(ref.keep.sum()) == rec["components"]
    assert rec["rejected"]["duplicate"] == 1500 - int(ref.keep.sum())


def test_ivf_plan_recall_and_bounded_difference(tmp_path):
    x, group = planted(6000, 96, seed=3)
    run = str(tmp_path / "run")
    synthetic_run(run, x, 250)
    cfg = _config(("index.exact_max", 1000), ("block_rows", 2000), ("list_rows", 400), ("k", 16))
    rec = DedupeStage(cfg, run).execute(LocalExecutor())
    assert rec["plan"] == "ivf" and rec["nlist"] == 45 and rec["join_tasks"] > 1
    assert rec["edge_recall"] >= 0.99 and rec["recall_exact_edges"] > 50
    stored, area = _stored(run)
    exact = copy_detect(stored, k=16, threshold=0.6, priority=area, index=IndexConfig(kind="flat"))
    got = _dedup(run)["component"].to_numpy()
    found, truth = _pairs(got), _pairs(exact.component)
    assert found <= truth  # approximate candidates only ever miss edges: no pair is invented
    assert len(found & truth) >= 0.99 * len(truth)
    planted_pairs = _pairs(group)
    assert len(found & planted_pairs) >= 0.99 * len(planted_pairs)




@pytest.mark.parametrize("step,after", [("join", 3), ("cc-dup-r1", 1), ("resolve", 1)])
def test_killed_dedupe_resumes_to_identical_outputs(tmp_path, step, after):
    x, _ = planted(1200, 32, seed=4)
    cfg = _config(("index.exact_max", 500), ("block_rows", 400), ("list_rows", 200), ("k", 8))
    ref_run, run = str(tmp_path / "ref"), str(tmp_path / "run")
    synthetic_run(ref_run, x, 100)
    synthetic_run(run, x, 100)
    DedupeStage(cfg, ref_run).execute(LocalExecutor())
    with pytest.raises(Killed):
        DedupeStage(cfg, run).execute(DyingExecutor(step, after))
    rec = DedupeStage(cfg, run).execute(LocalExecutor())
    assert rec["parts_skipped"] >= after
    assert _dedup(run).equals(_dedup(ref_run))


def test_every_task_holds_at_most_one_block(tmp_path):
    """The memory contract, counted in rows: no task reads more than ``block_rows`` vectors (IVF list groups are
    packed from a sample estimate: 25% slack), whatever the plan."""
    x, _ = planted(3000, 32, seed=5)
    run = str(tmp_path / "run")
    synthetic_run(run, x, 60)
    for exact_max in (50_000, 1000):
        cfg = _config(("index.exact_max", exact_max), ("block_rows", 960), ("list_rows", 120), ("k", 8))
        stage = DedupeStage(cfg, run)
        rec = stage.execute(LocalExecutor())
        assert rec["blocks"] == 4 and rec["plan"] == ("exact" if exact_max > 3000 else "ivf")
        for step in ("join", "reduce", "keep", "resolve", "write"):
            rows = [int(m["in"]) for m in stage.store.done(step, stage.config_hash).values()]
            assert rows and max(rows) <= 960 * (1.25 if step == "join" else 1), (step, rows)
        from curation.io.fs import get_fs

        fs, path = get_fs(run)
        fs.rm(f"{path}/dedup", recursive=True)
        fs.rm(f"{path}/_work", recursive=True)
