"""Report stage: an offline HTML page whose PNGs exist and show what the run did."""

from __future__ import annotations

import random
import re
from collections import Counter

from PIL import Image

from curation.config import RunConfig
from curation.io.fs import read_json, read_parquet
from curation.stages import LocalExecutor, run_stages
from pretrain.utils.config import load_config

from .conftest import make_copy, photos, write_copy_corpus


def test_report_renders_offline_with_every_section(tmp_path):
    truth = write_copy_corpus(tmp_path / "pool", originals=9, copies=2, seed=1)
    rng = random.Random(2)
    (tmp_path / "seeds").mkdir()
    for i in (0, 4):
        (tmp_path / "seeds" / f"s{i}.jpg").write_bytes(make_copy(photos()[i][1], rng)[0])
    cfg = load_config(
        RunConfig,
        "curation/recipes/default.toml",
        [f'ingest.sources=["{tmp_path / "pool"}"]', "embed.batch_size=8",
         'stages=["ingest", "embed", "dedupe", "cluster", "retrieve", "shard", "report"]',
         "cluster.levels=[{n_clusters=3}]", "cluster.target_size=5",
         f'retrieve.seeds=[{{name="s", sources=["{tmp_path / "seeds"}"], n_per_seed=2}}]',
         "report.images_per_cluster=4", "report.clusters_shown=1", "report.retrieval_seeds=2", "report.thumb=48"],
    )  # fmt: skip
    run = str(tmp_path / "run")
    rec = run_stages(cfg, run, LocalExecutor())["report"]
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    pngs = re.findall(r"<img src='([^']+)'>", page)
    assert sorted(pngs) == rec["pngs"] == sorted([
        "funnel.png", "rejects.png", "cluster_sizes_before.png", "cluster_sizes_after.png", "clusters_largest.png",
        "clusters_smallest.png", "clusters_random.png", "duplicates.png", "retrieval.png"])  # fmt: skip
    for p in pngs:
        with Image.open(tmp_path / "run" / "report" / p) as im:
            im.verify()
    for heading in ("Funnel", "Cluster sizes", "Clusters", "Duplicate groups", "Retrieval", "Stages"):
        assert f"<h2>{heading}</h2>" in page
    dedupe = read_json(f"{run}/dedup/_SUCCESS.json")
    comp = read_parquet(f"{run}/dedup/part-00000.parquet")["component"].to_pylist()
    groups = sum(c > 1 for c in Counter(comp).values())
    assert groups >= 4 and dedupe["rejected"]["duplicate"] >= len(truth) - 9 - 2  # copies of 6 of the 9 photos
    dup = Image.open(tmp_path / "run" / "report" / "duplicates.png")
    assert (dup.height - 4) // (48 + 14 + 4) == min(groups, 8) and dup.width >= 150 + 2 * 48  # one row per group
    ret = Image.open(tmp_path / "run" / "report" / "retrieval.png")
    assert ret.height >= 2 * 48 and ret.width >= 150 + 3 * 48  # seed + its 2 neighbours per row
    assert f"<td>{dedupe['out']}</td>" in page  # kept images in the funnel table
    # the report is part of the run's resume protocol: a rerun skips it ...
    again = run_stages(cfg, run, LocalExecutor())["report"]
    assert again["config_hash"] == rec["config_hash"] and again["seconds"] == rec["seconds"]
    # ... and a report drawn before the later stages ran is redrawn once they did
    early = str(tmp_path / "early")
    run_stages(cfg, early, LocalExecutor(), ["ingest", "embed", "dedupe", "report"])
    first = (tmp_path / "early" / "report" / "index.html").read_text()
    assert "The cluster stage did not run" in first and "retrieval.png" not in first
    run_stages(cfg, early, LocalExecutor())
    assert "retrieval.png" in (tmp_path / "early" / "report" / "index.html").read_text()
