"""End to end on a real Ray head (127.0.0.1, own temp dir and ports): `infra/ray/submit.sh` -> `ray job submit`
-> `python -m curation run`, then only that head is stopped; and the README's local job path, run as written.

Stopping safely: `ray stop` would kill every Ray on the machine (other engineers run Ray too), so the head's
processes are found by their unique temp dir or GCS address in /proc (plus all their descendants) and
terminated, then killed after a grace period.
"""

from __future__ import annotations

import json
import os
import re
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


def _readme_job_commands() -> list[str]:
    """The shell commands of the README's "To try the job path locally" block (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"To try the job path locally.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its local job path block"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def test_readme_local_job_path_works_without_the_venv_on_path(tmp_path):
    """The README's three commands (start a head, submit.sh, stop it) from the repository root, with a PATH that
    does not hold the virtualenv. Only what a shared test machine needs is changed: the head's ports and temp dir
    are private (a free port for each fixed one, plus free agent/client ports appended) and the run directory is
    under tmp_path (still relative, as in the README)."""
    # The README's commands name the repository's .venv: `make test` always creates it, so no skip here.
    assert (REPO / ".venv" / "bin" / "ray").exists(), "the README's job path needs the repository's .venv: make setup"
    start, submit, stop = _readme_job_commands()
    assert start.startswith("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled .venv/bin/ray start --head")
    assert submit.startswith("infra/ray/submit.sh http://127.0.0.1:48265 default runs/local")
    assert stop == ".venv/bin/python -m curation.ray.local_cluster stop /tmp/myray"
    temp_dir = tempfile.mkdtemp(prefix="rdme-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr = free_ports(9)
    run = os.path.relpath(tmp_path / "run", REPO)

    def private(cmd: str) -> str:
        return (cmd.replace("46379", str(gcs)).replace("48265", str(dash)).replace("/tmp/myray", temp_dir)
                .replace("runs/local", run))  # fmt: skip

    start = private(start) + (
        f" --ray-client-server-port {client} --dashboard-agent-listen-port {agent} --dashboard-agent-grpc-port "
        f"{agent_grpc} --metrics-export-port {metrics} --runtime-env-agent-port {rt_agent} --node-manager-port "
        f"{node_mgr} --object-manager-port {obj_mgr} --disable-usage-stats"
    )
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and Path(p).resolve() != VENV_BIN.resolve() and ".venv" not in p)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS", "PYTHONPATH")}
    env.update(PATH=path, RAY_USAGE_STATS_ENABLED="0")
    markers = [temp_dir, f"127.0.0.1:{gcs}"]

    def sh(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        started = sh(start, 180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        job = sh(private(submit), 600)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "joining the Ray cluster of this job" in job.stdout + job.stderr
        stopped = sh(private(stop), 60)
        assert stopped.returncode == 0 and not process_tree(markers), stopped.stdout + stopped.stderr
    finally:
        stop_processes(markers)
        shutil.rmtree(temp_dir, ignore_errors=True)
    ingest = json.loads((tmp_path / "run" / "manifest" / "_SUCCESS.json").read_text())
    dedupe = json.loads((tmp_path / "run" / "dedup" / "_SUCCESS.json").read_text())
    assert ingest["out"] == 12 and dedupe["in"] == 12  # the 12 mate nature backgrounds
