"""A whole curation run as a Ray job on a 3-node cluster on 127.0.0.1 (head without CPUs + 2 one-CPU worker
nodes, 2 GB memory and 200 MB object store each) gives the same outputs as the Ray-free executor, and its parts
really run on both worker nodes, with their peak RSS recorded."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.cli import load_run_config
from curation.io.fs import read_json, read_parquet
from curation.ray.local_cluster import LocalRayCluster, _classify, process_tree, stop_processes
from curation.stages import LocalExecutor, run_stages

from .conftest import make_copy, photos, write_copy_corpus

STAGES = ["ingest", "embed", "dedupe", "cluster", "retrieve", "shard"]


def _overrides(src: Path, seeds: Path) -> list[str]:
    seed_set = f'[{{name="copies", sources=["{seeds}"], n_per_seed=3}}]'
    return [f'ingest.sources=["{src}"]', "ingest.files_per_part=4", "ingest.rows_per_part=4", "embed.batch_size=4",
            f"stages={json.dumps(STAGES)}", 'cluster.levels=[{n_clusters=3, init="kmeans++"}]',
            f"retrieve.seeds={seed_set}", "shard.samples_per_shard=4"]  # fmt: skip


def _table(run: Path, sub: str) -> pa.Table:
    parts = sorted((run / sub).glob("part-*.parquet"))
    assert parts, f"no parts in {run / sub}"
    return pa.concat_tables([read_parquet(str(p)) for p in parts])


def test_multinode_job_matches_local_executor(tmp_path):
    write_copy_corpus(tmp_path / "src", originals=6, copies=2, seed=3)  # 14 images, 4 copy groups
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    rng = random.Random(1)
    for name, im in photos(384)[:2]:
        (seeds / f"{name}.jpg").write_bytes(make_copy(im, rng)[0])
    overrides = _overrides(tmp_path / "src", seeds)
    ray_run = tmp_path / "ray-run"
    args = ["run", "default", "--out", str(ray_run)] + [a for o in overrides for a in ("--set", o)]
    with LocalRayCluster(workers=2, cpus_per_node=1, memory_bytes=2 * 10**9, object_store_bytes=200 * 10**6,
                         head_cpus=0) as cluster:  # fmt: skip
        proc = cluster.submit(args, timeout=300)
        peaks = cluster.process_peak_rss_mb()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "joining the Ray cluster of this job" in proc.stdout + proc.stderr

    rec = {s: read_json(str(ray_run / d / "_SUCCESS.json"))
           for s, d in [("ingest", "manifest"), ("embed", "embeddings"), ("dedupe", "dedup"),
                        ("cluster", "clusters"), ("retrieve", "selection"), ("shard", "shards")]}  # fmt: skip
    assert rec["ingest"]["out"] == 14 and rec["dedupe"]["out"] == 6 and rec["embed"]["actors"] == 2
    # the head has no CPUs, so every part ran on a worker node, and the stages used both of them (which node
    # runs a given part is up to Ray's scheduler, so this holds over the run, not for every stage)
    assert all(r.get("nodes", 0) <= 2 for r in rec.values()) and max(r.get("nodes", 0) for r in rec.values()) == 2
    for r in rec.values():
        assert 20 < r["driver_peak_rss_mb"] < 8192
        if r["parts_computed"] and "nodes" in r:
            assert 20 < r["worker_peak_rss_mb"] < 8192
    assert {"gcs", "raylet", "worker", "driver"} <= set(peaks) and all(v > 1 for v in peaks.values())
    assert peaks["driver"] >= 0.9 * max(r["driver_peak_rss_mb"] for r in rec.values())

    local_run = tmp_path / "local-run"
    local = run_stages(load_run_config("default", overrides), str(local_run), LocalExecutor())
    assert {k: v["out"] for k, v in local.items()} == {k: v["out"] for k, v in rec.items()}

    ray_dedup, local_dedup = _table(ray_run, "dedup"), _table(local_run, "dedup")
    for col in ("uid", "component", "keep", "nearest_uid", "contaminated"):
        assert ray_dedup[col].to_pylist() == local_dedup[col].to_pylist(), col
    np.testing.assert_allclose(ray_dedup["score"].to_numpy(), local_dedup["score"].to_numpy(), rtol=1e-6)
    assert _table(ray_run, "selection").equals(_table(local_run, "selection"))
    ray_tars = sorted(p.name for p in (ray_run / "shards").glob("*.tar"))
    assert ray_tars and ray_tars == sorted(p.name for p in (local_run / "shards").glob("*.tar"))
    for name in ray_tars:
        assert (ray_run / "shards" / name).read_bytes() == (local_run / "shards" / name).read_bytes(), name


def test_process_tree_matches_whole_ports_and_stops_only_its_processes():
    """Markers select processes by their command line (a port marker never matches a longer port) plus their
    descendants; ``stop_processes`` ends exactly those."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "time.sleep(60)"  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code, "127.0.0.1:12345"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "127.0.0.1:1234"])
    try:
        deadline = time.time() + 10
        while len(process_tree(["127.0.0.1:12345"])) < 2 and time.time() < deadline:
            time.sleep(0.1)
        tree = process_tree(["127.0.0.1:12345"])
        assert parent.pid in tree and len(tree) == 2 and other.pid not in tree  # the child has no marker
        assert process_tree(["127.0.0.1:1234"]) == {other.pid}
        stop_processes(["127.0.0.1:12345"], grace=2)
        assert not process_tree(["127.0.0.1:12345"]) and other.poll() is None
    finally:
        other.kill()
        parent.kill()
        parent.wait()
        other.wait()


def test_process_roles_classify_ray_processes():
    assert _classify("/v/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/x") == "gcs"
    assert _classify("/v/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/x") == "raylet"
    assert _classify("ray::IDLE") == _classify("ray::MapWorker(_ActorWorker)") == "worker"
    assert _classify("/v/bin/python /v/ray/_private/workers/default_worker.py --node-ip-address=1") == "worker"
    assert _classify("/v/bin/python -m curation run default --out /tmp/r") == "driver"
    assert _classify("ray::DashboardAgent") == _classify("ray::RuntimeEnvAgent") == "other"
    assert _classify("/v/bin/python -B -c from multiprocessing.spawn import spawn_main") is None
