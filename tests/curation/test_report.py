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


def rec_shard(run: str) -> int:
    return int(read_json(f"{run}/shards/_SUCCESS.json")["out"])


def test_report_renders_offline_with_every_section(tmp_path):
    truth = write_copy_corpus(tmp_path / "pool", originals=9, copies=2, seed=1)
    rng = random.Random(2)
    (tmp_path / "seeds").mkdir()
    for i in (0, 4):
        (tmp_path / "seeds" / f"s{i}.jpg").write_bytes(make_copy(photos()[i][1], rng)[0])
    overrides = [
        f'ingest.sources=["{tmp_path / "pool"}"]', "embed.batch_size=8",
        'stages=["ingest", "embed", "dedupe", "cluster", "retrieve", "shard", "report"]',
        "cluster.levels=[{n_clusters=3}]", "cluster.target_size=5",
        f'retrieve.seeds=[{{name="s", sources=["{tmp_path / "seeds"}"], n_per_seed=2}}]',
        "report.images_per_cluster=4", "report.clusters_shown=1", "report.retrieval_seeds=2", "report.thumb=48",
    ]  # fmt: skip
    cfg = load_config(RunConfig, "curation/recipes/default.toml", overrides)
    run = str(tmp_path / "run")
    rec = run_stages(cfg, run, LocalExecutor())["report"]
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    pngs = re.findall(r"<img src='([^']+)'>", page)
    assert sorted(pngs) == rec["pngs"] == sorted([
        "funnel.png", "rejects.png", "scores_dedup.png", "scores_verify.png", "score_pairs.png",
        "cluster_sizes_before.png", "cluster_sizes_after.png", "clusters_largest.png", "clusters_smallest.png",
        "clusters_random.png", "duplicates.png", "retrieval.png", "retrieval_worst.png"])  # fmt: skip
    for p in pngs:
        with Image.open(tmp_path / "run" / "report" / p) as im:
            im.verify()
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert headings == ["Settings", "Funnel", "Scores", "Cluster sizes", "Clusters", "Duplicate groups", "Retrieval",
                        "Worst retrievals", "Stages"]  # fmt: skip
    assert "{'" not in page and "': " not in page  # numbers are tables, not Python dicts
    # settings: model, thresholds, k, balanced sample size, seed sets
    for row in ("<td>embed</td><td>model</td><td>built-in descriptor (no weights)</td>",
                "<td>dedupe</td><td>neighbours per image (k)</td><td>64</td>",
                "<td>dedupe</td><td>candidate threshold</td><td>0.1 (best 32 per image)</td>",
                "<td>dedupe</td><td>single-threshold baseline (not used)</td><td>0.42</td>",
                "<td>cluster</td><td>balanced sample</td><td>5 images (random)</td>",
                "<td>retrieve</td><td>seed set s</td><td>knn: 2 nearest per seed"):  # fmt: skip
        assert row in page
    # funnel in stage order, never going up
    funnel = re.search(r"<table class='funnel'>(.*?)</table>", page).group(1)
    steps = re.findall(r"<tr><td>([^<]+)</td><td>(\d+)</td>", funnel)
    assert [s for s, _ in steps] == ["files read (ingest in)", "accepted (unique images)", "embedded",
                                     "kept after dedupe", "selected (retrieve)", "sharded"]  # fmt: skip
    counts = [int(n) for _, n in steps]
    assert counts == sorted(counts, reverse=True) and counts[0] == len(truth) and counts[-1] == rec_shard(run)
    # score histograms (one per source) and the pairs around the thresholds, worst retrievals per seed set
    for name in ("scores_dedup.png", "scores_verify.png"):
        assert Image.open(tmp_path / "run" / "report" / name).size == (720, 300)
    pairs = Image.open(tmp_path / "run" / "report" / "score_pairs.png")
    assert pairs.width >= 150 + 2 * 48 and (pairs.height - 4) // (48 + 14 + 4) >= 3  # above/below + extremes
    worst = Image.open(tmp_path / "run" / "report" / "retrieval_worst.png")
    assert (worst.height - 4) // (48 + 14 + 4) == 1 and worst.width >= 150 + 2 * 48  # one seed set, seed + image
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
    # ... and a report drawn before the later stages ran is redrawn once they did (here: one threshold, no
    # verification, so no verdict histogram; the pairs below the threshold are searched in embeddings/)
    early = str(tmp_path / "early")
    single = load_config(RunConfig, "curation/recipes/default.toml", [*overrides, "dedupe.verify=false"])
    run_stages(single, early, LocalExecutor(), ["ingest", "embed", "dedupe", "report"])
    first = (tmp_path / "early" / "report" / "index.html").read_text()
    assert "The cluster stage did not run" in first and "retrieval.png" not in first
    assert "scores_dedup.png" in first and "score_pairs.png" in first and "scores_verify.png" not in first
    assert "<td>dedupe</td><td>threshold</td><td>0.42</td>" in first and "Worst retrievals" not in first
    assert re.findall(r"<tr><td>([^<]+)</td><td>\d+</td>", first.split("class='funnel'>")[1].split("</table>")[0]) \
        == ["files read (ingest in)", "accepted (unique images)", "embedded", "kept after dedupe"]
    run_stages(single, early, LocalExecutor())
    assert "retrieval.png" in (tmp_path / "early" / "report" / "index.html").read_text()
