"""The report's score histograms, borderline pairs, worst retrievals and funnel: per-part reads equal the
whole-table computations, and the funnel never goes up."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from curation import schemas
from curation.io.fs import write_parquet
from curation.report.tables import counts_text, funnel_steps, html_table
from curation.stages import LocalExecutor
from curation.stages.report_scores import (
    dedup_scores,
    nearest_partners,
    score_edges,
    verify_scores,
    worst_retrievals,
)
from curation.stages.verify_steps import VERIFIED

SIZES = [23, 0, 31, 17]  # rows per part (one empty part)
M = 3


def _uid(i: int) -> str:
    return hashlib.sha1(str(i).encode()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic ``embeddings``, ``dedup``, ``verify`` and ``retrieval`` parts over 71 images."""
    root = str(tmp_path_factory.mktemp("scores") / "run")
    rng = np.random.default_rng(1)
    n, dim = sum(SIZES), 16
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb = emb.astype(np.float16).astype(np.float32)  # as stored
    uids = [_uid(i) for i in range(n)]
    score = rng.uniform(0, 1, n).astype(np.float32)
    nearest = [_uid(int(rng.integers(n))) if s > 0.5 else None for s in score]
    starts = np.r_[0, np.cumsum(SIZES)]
    for p in range(len(SIZES)):
        sl = slice(starts[p], starts[p + 1])
        values = pa.array(emb[sl].astype(np.float16).ravel(), pa.float16())
        write_parquet(f"{root}/embeddings/part-{p:05d}.parquet", pa.table({
            "uid": pa.array(uids[sl], pa.string()),
            "emb": pa.FixedSizeListArray.from_arrays(values, dim)}))  # fmt: skip
        write_parquet(f"{root}/dedup/part-{p:05d}.parquet", pa.table({
            "uid": uids[sl], "component": np.arange(n)[sl], "keep": score[sl] < 0.7, "nearest_uid": nearest[sl],
            "score": score[sl], "contaminated": np.zeros(SIZES[p], bool)}, schema=schemas.DEDUP))  # fmt: skip
        k = SIZES[p] * 2
        pair_score = rng.uniform(0.1, 1, k).astype(np.float32)
        write_parquet(f"{root}/verify/part-{p:05d}.parquet", pa.table({
            "uid": [uids[int(i)] for i in rng.integers(0, n, k)],
            "other_uid": [uids[int(i)] for i in rng.integers(0, n, k)],
            "score": pair_score, "inliers": rng.integers(0, 60, k).astype(np.int32),
            "inlier_ratio": rng.uniform(0, 1, k).astype(np.float32), "flipped": np.zeros(k, bool),
            "verdict": pair_score + rng.normal(0, 0.2, k) > 0.5, "reason": ["x"] * k}, schema=VERIFIED))  # fmt: skip
        write_parquet(f"{root}/retrieval/part-{p:05d}.parquet", pa.table({
            "seed_set": [["a", "b"][i % 2] for i in range(SIZES[p])], "seed_uid": [_uid(1000 + i % 5) for i in
                                                                                   range(SIZES[p])],
            "uid": uids[sl], "score": rng.uniform(0, 1, SIZES[p]).astype(np.float32),
            "reason": ["knn"] * SIZES[p], "rank": np.zeros(SIZES[p], np.int32)}))  # fmt: skip
    return root, uids, emb / np.linalg.norm(emb, axis=1, keepdims=True), score, nearest


def _all(root: str, name: str) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for p in range(len(SIZES)) for r in pq.read_table(f"{root}/{name}/part-{p:05d}.parquet").to_pylist()]


def test_dedup_scores_equal_the_whole_table(run):
    root, uids, emb, score, nearest = run
    thresholds = [0.42, 0.6]
    edges = score_edges(thresholds)
    got = dedup_scores(LocalExecutor(), root, len(SIZES), edges, thresholds, M)
    keep = score < 0.7
    assert got["kept"] == np.histogram(score[keep], edges)[0].tolist()
    assert got["dropped"] == np.histogram(score[~keep], edges)[0].tolist()
    for t in thresholds:
        above = sorted((s, u) for u, s, o in zip(uids, score.tolist(), nearest) if o is not None and s >= t)[:M]
        assert [(p["score"], p["uid"]) for p in got["near"][f"above {t:g}"]] == above
        below = sorted(((s, u) for u, s in zip(uids, score.tolist()) if s < t), reverse=True)[:M]
        rows = got["near"][f"below {t:g}"]
        assert sorted(p["score"] for p in rows) == sorted(s for s, _ in below)
        sims = emb @ emb.T
        np.fill_diagonal(sims, -np.inf)
        for p in rows:  # the dedup nearest where there is one, else the nearest image searched in embeddings/
            i = uids.index(p["uid"])
            assert p["other_uid"] == (nearest[i] or uids[int(np.argmax(sims[i]))])
        assert t > 0.5 or all(nearest[uids.index(p["uid"])] is None for p in rows)  # below 0.5: all searched


def test_nearest_partners_skip_the_query_itself(run):
    root, uids, emb, _, _ = run
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    got = nearest_partners(LocalExecutor(), root, len(SIZES), [uids[0], uids[40]])
    assert got == {uids[0]: uids[int(np.argmax(sims[0]))], uids[40]: uids[int(np.argmax(sims[40]))]}
    assert nearest_partners(LocalExecutor(), root, len(SIZES), []) == {}


def test_verify_scores_split_by_verdict(run):
    root = run[0]
    rows = _all(root, "verify")
    thresholds = [0.1, 0.42]
    edges = score_edges(thresholds)
    got = verify_scores(LocalExecutor(), root, len(SIZES) + 1, edges, thresholds, M)  # a missing part is empty
    for key, verdict in (("copy", True), ("not", False)):
        want = np.histogram([r["score"] for r in rows if r["verdict"] == verdict], edges)[0].tolist()
        assert got[key] == want
    copies = sorted(r["score"] for r in rows if r["verdict"])[:M]
    assert [p["score"] for p in got["extremes"]["copies"]] == pytest.approx(copies)
    looks = sorted((r["score"] for r in rows if not r["verdict"]), reverse=True)[:M]
    assert [p["score"] for p in got["extremes"]["look-alikes"]] == pytest.approx(looks)
    assert all(p["score"] < 0.42 for p in got["near"]["below 0.42"]) and got["near"]["below 0.1"] == []
    assert [p["score"] for p in got["near"]["above 0.42"]] == pytest.approx(
        sorted(r["score"] for r in rows if r["score"] >= 0.42)[:M])


def test_worst_retrievals_are_the_lowest_scores_per_seed_set(run):
    root = run[0]
    rows = _all(root, "retrieval")
    got = worst_retrievals(LocalExecutor(), root, len(SIZES), M)
    assert sorted(got) == ["a", "b"]
    for name in ("a", "b"):
        want = sorted(r["score"] for r in rows if r["seed_set"] == name)[:M]
        assert [p["score"] for p in got[name]] == pytest.approx(want)


def test_funnel_goes_down_in_stage_order_and_tables_are_not_reprs():
    recs = {
        "ingest": {"in": 30, "out": 26, "rejected": {"truncated": 2, "not_an_image": 0}, "duplicates": 2},
        "embed": {"in": 26, "out": 25, "rejected": {"decode": 1}},
        "dedupe": {"in": 25, "out": 18, "rejected": {"duplicate": 7, "contaminated": 0}},
        "cluster": {"in": 18, "out": 18, "rejected": {}, "balanced": 8},  # clustered: not a funnel step
        "retrieve": {"in": 18, "out": 11, "rejected": {}},
        "shard": {"in": 11, "out": 11, "rejected": {}, "selection": "selection"},
    }
    steps = funnel_steps(recs)
    assert [s[0] for s in steps] == ["files read (ingest in)", "accepted (unique images)", "embedded",
                                     "kept after dedupe", "selected (retrieve)", "sharded"]  # fmt: skip
    counts = [n for _, n, _ in steps]
    assert counts == sorted(counts, reverse=True) == [30, 26, 25, 18, 11, 11]
    assert steps[1][2] == "4 (truncated 2, exact duplicate 2)" and steps[3][2] == "7 (duplicate 7)"
    recs["shard"]["selection"] = "balanced"
    assert funnel_steps(recs)[4] == ("selected (balanced sample)", 8, "10 (not sampled)")
    assert counts_text({"a": 0}) == "-"
    table = html_table(["reason", "images"], [("<b>", {"x": 1, "y": 0})])
    assert "<td>&lt;b&gt;</td><td>x 1</td>" in table and "{" not in table
