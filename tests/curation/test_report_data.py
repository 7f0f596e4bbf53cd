"""The report's bounded pool reads (per-part tasks) equal the whole-table computations they replace."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from curation import schemas
from curation.io.fs import write_parquet
from curation.stages import LocalExecutor
from curation.stages.report_data import (
    cluster_members,
    cluster_sizes,
    component_members,
    largest_components,
    retrieval_hits,
)

SIZES = [37, 0, 52, 41, 19]  # rows per part (one empty part)


def _uid(i: int) -> str:
    return hashlib.sha1(str(i).encode()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic ``clusters/assign`` and ``dedup`` parts: 149 images, 9 clusters, components of 1..12 members
    whose id is the run-wide row of their first member."""
    root = str(tmp_path_factory.mktemp("report") / "run")
    rng = np.random.default_rng(0)
    n = sum(SIZES)
    l1 = rng.integers(0, 9, n)
    group = np.where(rng.random(n) < 0.7, rng.integers(0, 60, n), 1000 + np.arange(n))  # ~30% singletons
    first: dict[int, int] = {}
    for i, g in enumerate(group.tolist()):
        first.setdefault(g, i)
    component = np.array([first[g] for g in group.tolist()], np.int64)
    keep = component == np.arange(n)
    score = rng.random(n).astype(np.float32)
    start = 0
    for p, s in enumerate(SIZES):
        rows = slice(start, start + s)
        uids = [_uid(i) for i in range(start, start + s)]
        write_parquet(f"{root}/clusters/assign/part-{p:05d}.parquet", pa.table(
            {"uid": uids, "l1": pa.array(l1[rows], pa.int32()), "dist": pa.array(score[rows])},
            schema=schemas.assign_schema(1)))  # fmt: skip
        write_parquet(f"{root}/dedup/part-{p:05d}.parquet", pa.table(
            {"uid": uids, "component": component[rows], "keep": keep[rows], "nearest_uid": pa.nulls(s, pa.string()),
             "score": score[rows], "contaminated": np.zeros(s, bool)}, schema=schemas.DEDUP))  # fmt: skip
        start += s
    return root, l1, component, keep, score


def test_cluster_sizes_and_members_by_rank(run):
    root, l1, *_ = run
    ex = LocalExecutor()
    assert cluster_sizes(ex, root, len(SIZES), 9).tolist() == np.bincount(l1, minlength=9).tolist()
    assert cluster_sizes(ex, root, len(SIZES), 12).tolist() == np.bincount(l1, minlength=12).tolist()
    rng = np.random.default_rng(5)
    picks = {c: np.sort(rng.choice(int((l1 == c).sum()), size=6, replace=False)) for c in (0, 4, 8)}
    got = cluster_members(ex, root, len(SIZES), picks)
    for c, ranks in picks.items():
        assert got[c] == [_uid(int(i)) for i in np.flatnonzero(l1 == c)[ranks]]


def test_largest_components_and_their_members(run, tmp_path):
    root, _, component, keep, score = run
    ids, counts = np.unique(component, return_counts=True)
    multi = ids[counts > 1][np.argsort(-counts[counts > 1], kind="stable")]
    for k in (1, 5, 100):
        images, top = largest_components(LocalExecutor(), root, str(tmp_path / "work"), len(SIZES), k)
        assert images == len(component)
        assert [c for c, _ in top] == multi[:k].tolist()
        assert [s for _, s in top] == [int((component == c).sum()) for c in multi[:k]]
        assert not (tmp_path / "work").exists()  # the shuffle files are removed
    chosen = multi[:4].tolist()
    got = component_members(LocalExecutor(), root, len(SIZES), chosen, 3)
    for c in chosen:
        members = [
            {"uid": _uid(i), "keep": bool(keep[i]), "score": float(score[i])} for i in np.flatnonzero(component == c)
        ]
        rows = sorted(members, key=lambda r: (not r["keep"], r["uid"]))[:3]
        assert [{k: r[k] for k in ("uid", "keep", "score")} for r in got[c]] == rows
        assert got[c][0]["keep"]  # the kept image first


def test_retrieval_hits_stream_several_parts(tmp_path):
    root = str(tmp_path / "run")
    rng = np.random.default_rng(1)
    pairs = [{"seed_set": s, "seed_uid": f"q{q}", "uid": _uid(i), "score": float(np.float32(rng.random())),
              "reason": "knn", "rank": i} for i, (s, q) in enumerate((s, q) for s in ("a", "b") for q in range(5)
                                                                      for _ in range(4))]  # fmt: skip
    for p, chunk in enumerate((pairs[:13], pairs[13:30], pairs[30:])):
        write_parquet(f"{root}/retrieval/part-{p:05d}.parquet", pa.Table.from_pylist(chunk, schema=schemas.RETRIEVAL))
    chosen, hits = retrieval_hits(root, 3, np.random.default_rng(3), 3, 2)
    seeds = sorted({(p["seed_set"], p["seed_uid"]) for p in pairs})
    pick = sorted(np.random.default_rng(3).choice(len(seeds), size=3, replace=False).tolist())
    assert chosen == [seeds[i] for i in pick]
    for s in chosen:
        best = sorted((p for p in pairs if (p["seed_set"], p["seed_uid"]) == s), key=lambda p: -p["score"])[:2]
        assert [h["uid"] for h in hits[s]] == [p["uid"] for p in best]
