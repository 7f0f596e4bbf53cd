"""Two-stage copy detection inside the dedupe stage: descriptor candidates, geometric verification as tasks,
only verified pairs as copy edges; per-pair records; sources that vanish before verification."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import RunConfig
from curation.stages import LocalExecutor, run_stages
from pretrain.utils.config import load_config

from .conftest import jpeg_bytes, make_copy, photos


def _table(run: Path, sub: str) -> pa.Table:
    parts = sorted((run / sub).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def _pool(root: Path) -> dict[str, str]:
    """Photos, two edited copies of each of the first six, and four disjoint tiles of one large photo (look-alike
    distractors that a global descriptor confuses); ``{file: group}``."""
    rng = random.Random(1)
    root.mkdir(parents=True)
    truth = {}
    pics = photos(512)
    for g, (name, im) in enumerate(pics[:10]):
        (root / f"{name}.jpg").write_bytes(jpeg_bytes(im))
        truth[str(root / f"{name}.jpg")] = name
        for c in range(2 if g < 6 else 0):
            data, _ = make_copy(im, rng)
            (root / f"{name}_copy{c}.jpg").write_bytes(data)
            truth[str(root / f"{name}_copy{c}.jpg")] = name
    big = dict(photos(1024))["retina"]
    w, h = big.size
    for i, (x, y) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
        tile = big.crop((x * w // 2, y * h // 2, (x + 1) * w // 2, (y + 1) * h // 2))
        (root / f"tile{i}.jpg").write_bytes(jpeg_bytes(tile))
        truth[str(root / f"tile{i}.jpg")] = f"tile{i}"
    return truth


def _config(pool: Path, *extra: str) -> RunConfig:
    return load_config(RunConfig, "curation/recipes/default.toml",
                       [f'ingest.sources=["{pool}"]', "ingest.rows_per_part=7", "dedupe.block_rows=16", *extra])


def test_only_verified_pairs_become_copy_edges(tmp_path):
    truth = _pool(tmp_path / "pool")
    run = tmp_path / "run"
    rec = run_stages(_config(tmp_path / "pool"), str(run), LocalExecutor())["dedupe"]
    uri = {r["uid"]: r["uri"] for r in _table(run, "manifest").to_pylist()}
    dedup = {uri[r["uid"]]: r for r in _table(run, "dedup").to_pylist()}
    checks = _table(run, "verify").to_pylist()
    assert rec["candidates"] == len(checks) > rec["verified"] > 0
    for c in checks:  # every candidate pair has its record: descriptor score, inliers, ratio, verdict
        same = truth[uri[c["uid"]]] == truth[uri[c["other_uid"]]]
        if c["verdict"] is None:  # not checked: its task had already connected both images by verified pairs
            assert c["reason"] == "connected" and same, (uri[c["uid"]], uri[c["other_uid"]], c)
            continue
        assert c["verdict"] == same, (uri[c["uid"]], uri[c["other_uid"]], c)
        assert (c["reason"] is None) == c["verdict"] and c["score"] > 0.0
    assert rec["checked_pairs"] + rec["connected_pairs"] == len(checks) and rec["verified_images"] <= len(truth)
    comp = {f: dedup[f]["component"] for f in truth}
    for f in truth:  # components are exactly the ground-truth groups: copies together, tiles apart
        assert {g for g in truth if comp[g] == comp[f]} == {g for g in truth if truth[g] == truth[f]}
    assert rec["out"] == len(set(truth.values()))
    assert all(dedup[f]["nearest_uid"] is None for f in truth if f.rsplit("/", 1)[-1].startswith("tile"))
    # stage stats: the largest components with their most loosely attached member
    sizes = sorted((n for n in Counter(truth.values()).values() if n > 1), reverse=True)[:5]
    assert [c["size"] for c in rec["largest_components"]] == sizes
    by_uid = {r["uid"]: r for r in _table(run, "dedup").to_pylist()}
    for c in rec["largest_components"]:
        members = [r for r in by_uid.values() if r["component"] == c["component"]]
        assert len(members) == c["size"] and c["weakest_uid"] in {r["uid"] for r in members}
        assert c["weakest_score"] == pytest.approx(min(r["score"] for r in members), abs=1e-4)
        assert c["weakest_partner"] == by_uid[c["weakest_uid"]]["nearest_uid"]


def test_single_threshold_mode_groups_look_alike_tiles(tmp_path):
    """The former mode (``dedupe.verify = false``) is still available, and shows what verification prevents."""
    truth = _pool(tmp_path / "pool")
    run = tmp_path / "run"
    rec = run_stages(_config(tmp_path / "pool", "dedupe.verify=false", "dedupe.threshold=0.3"), str(run),
                     LocalExecutor())["dedupe"]  # fmt: skip
    assert "verified" not in rec and not (run / "verify").exists()
    uri = {r["uid"]: r["uri"] for r in _table(run, "manifest").to_pylist()}
    groups: dict[int, set[str]] = {}
    for r in _table(run, "dedup").to_pylist():
        groups.setdefault(r["component"], set()).add(truth[uri[r["uid"]]])
    assert any(len(g) > 1 for g in groups.values())  # distinct photos merged by the descriptor alone
    top = rec["largest_components"][0]  # the stage stats show it: the largest component and its weakest link
    assert top["size"] == max(sum(1 for r in _table(run, "dedup").to_pylist() if r["component"] == c)
                              for c in groups) and top["weakest_score"] > 0.3  # fmt: skip


def test_vanished_source_is_recorded_and_the_run_goes_on(tmp_path):
    truth = _pool(tmp_path / "pool")
    run = tmp_path / "run"
    cfg = _config(tmp_path / "pool")
    run_stages(cfg, str(run), LocalExecutor(), ["ingest", "embed"])
    gone = next(f for f in truth if "_copy0" in f)
    Path(gone).unlink()  # the source changed after embedding
    changed = next(f for f in truth if "_copy1" in f)
    Path(changed).write_bytes(b"not an image any more")
    rec = run_stages(cfg, str(run), LocalExecutor(), ["dedupe"])["dedupe"]
    uri = {r["uid"]: r["uri"] for r in _table(run, "manifest").to_pylist()}
    bad = [c for c in _table(run, "verify").to_pylist() if {uri[c["uid"]], uri[c["other_uid"]]} & {gone, changed}]
    assert bad and all(not c["verdict"] and c["reason"] in ("unreadable", "decode:not_image", "decode:truncated")
                       for c in bad)  # fmt: skip
    assert rec["verify_unreadable_pairs"] == len(bad) and rec["in"] == len(truth)
