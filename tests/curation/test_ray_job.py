"""End to end on a real Ray head (127.0.0.1, own temp dir and ports): `infra/ray/submit.sh` -> `ray job submit`
-> `python -m curation run`, then only that head is stopped.

Stopping safely: `ray stop` would kill every Ray on the machine (other engineers run Ray too), so the head's
processes are found by their unique temp dir or GCS address in /proc (plus all their descendants) and
terminated, then killed after a grace period.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from curation.ray.local_cluster import free_ports, process_tree, stop_processes

from .conftest import REPO, write_copy_corpus

VENV_BIN = Path(sys.executable).parent


@pytest.fixture()
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rjob-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr = free_ports(9)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # fmt: skip
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--port", str(gcs), "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", "--dashboard-port", str(dash), "--num-cpus=2", "--temp-dir", temp_dir,
        "--disable-usage-stats", "--ray-client-server-port", str(client), "--dashboard-agent-listen-port",
        str(agent), "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(rt_agent), "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr), "--include-dashboard=true",
    ]  # fmt: skip
    markers = [temp_dir, f"127.0.0.1:{gcs}"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_processes(markers)
        assert not process_tree(markers), "head processes survived"
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline(ray_head, tmp_path):
    address, env = ray_head
    truth = write_copy_corpus(tmp_path / "src", originals=4, copies=1, seed=5)
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(REPO / "infra" / "ray" / "submit.sh"), address, "default", str(run),
         "--set", f'ingest.sources=["{tmp_path / "src"}"]', "--set", "ingest.rows_per_part=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "joining the Ray cluster of this job" in proc.stdout + proc.stderr
    ingest = json.loads((run / "manifest" / "_SUCCESS.json").read_text())
    embed = json.loads((run / "embeddings" / "_SUCCESS.json").read_text())
    dedupe = json.loads((run / "dedup" / "_SUCCESS.json").read_text())
    assert ingest["out"] == len(truth) == 6 and ingest["manifest_parts"] == 2
    assert embed["out"] == 6 and embed["actors"] == 2
    assert dedupe["in"] == 6 and dedupe["out"] == 4 and dedupe["rejected"]["duplicate"] == 2
    assert "[dedupe]" in (run / "config.toml").read_text()
