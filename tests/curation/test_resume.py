"""Kill-and-resume: a driver SIGKILLed mid-embed and a Ray worker dying mid-part both end in outputs identical
to an uninterrupted run, and finished parts are not recomputed; a killed driver's in-process Ray dies with it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec

from curation.config import RunConfig
from curation.stages import LocalExecutor, run_stages
from pretrain.utils.config import load_config

from .conftest import REPO, process_tree, stop_processes, write_copy_corpus


def _session(sid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.add(int(entry))
    return out


def kill_session(sid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of session ``sid`` (a driver started with ``start_new_session``) and wait."""
    deadline = time.time() + timeout
    while (pids := _session(sid)) and time.time() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    assert not _session(sid), f"processes of session {sid} survived"


def _alive(pids: set[int]) -> set[int]:
    """The pids of ``pids`` still running (a zombie counts as gone)."""
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                out.add(pid)
    return out


def _parquets(run_dir: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(run_dir)
    return {p[len(path):]: fs.cat_file(p) for p in fs.find(path) if p.endswith(".parquet")}


def _overrides(src: Path, factory: str, weights: str = "") -> list[str]:
    return [f'ingest.sources=["{src}"]', "ingest.rows_per_part=2", "embed.batch_size=1", 'embed.model="plugin"',
            f'embed.factory="tests.curation.conftest:{factory}"', f'embed.weights="{weights}"',
            "ray.num_cpus=2"]  # fmt: skip


def test_driver_sigkill_mid_embed_resumes_without_recomputing(tmp_path):
    write_copy_corpus(tmp_path / "src", originals=6, copies=1, seed=2)  # 10 images -> 5 manifest parts
    run = tmp_path / "run"
    ray_tmp = tempfile.mkdtemp(prefix="rres-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "CURATION_TEST_EMBED_DELAY": "0.4",
           "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    cmd = [sys.executable, "-m", "curation", "run", "default", "--out", str(run)]
    overrides = [*_overrides(tmp_path / "src", "slow_descriptor"), "ingest.files_per_part=64", "embed.num_actors=1"]
    for o in overrides:
        cmd += ["--set", o]
    markers = run / "_work" / "embed" / "embed"
    try:
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 180
        while time.time() < deadline and len(list(markers.glob("part-*.json"))) < 2:
            assert driver.poll() is None, "driver ended before it could be killed"
            time.sleep(0.05)
        ray_procs = (process_tree([ray_tmp]) | _session(driver.pid)) - {driver.pid}
        assert len(ray_procs) >= 5  # GCS, raylet, agents, workers
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, mid-embed: its Ray must not outlive it
        driver.wait()
        deadline = time.time() + 10
        while _alive(ray_procs) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(ray_procs), f"Ray processes outlived their driver: {sorted(_alive(ray_procs))}"
        assert not process_tree([ray_tmp]) and not _session(driver.pid)
        done_before = sorted(p.name for p in markers.glob("part-*.json"))
        assert 2 <= len(done_before) < 5 and not (run / "embeddings" / "_SUCCESS.json").exists()
        finished = {n: (run / "embeddings" / n.replace(".json", ".parquet")).stat().st_mtime_ns for n in done_before}

        ingest_done = (run / "manifest" / "_SUCCESS.json").stat().st_mtime_ns
        # Resume in a new driver without Ray: a stage's resumability does not depend on where its parts ran
        # (the Ray path of a rerun is the same run_parts skipping, covered with Ray by the worker-kill test).
        subprocess.run([*cmd, "--address", "none"], cwd=REPO, env=env, check=True, timeout=300, capture_output=True)
    finally:
        kill_session(driver.pid)
        stop_processes([ray_tmp])
        shutil.rmtree(ray_tmp, ignore_errors=True)
    embed = json.loads((run / "embeddings" / "_SUCCESS.json").read_text())
    assert embed["parts"] == 5 and embed["parts_computed"] == 5 - len(done_before)
    assert all((run / "embeddings" / n.replace(".json", ".parquet")).stat().st_mtime_ns == t
               for n, t in finished.items())  # fmt: skip
    assert (run / "manifest" / "_SUCCESS.json").stat().st_mtime_ns == ingest_done  # finished before the kill: skipped

    reference = "memory://uninterrupted"
    cfg = load_config(RunConfig, "curation/recipes/default.toml", overrides)
    run_stages(cfg, reference, LocalExecutor())
    got, want = _parquets(str(run)), _parquets(reference)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    fsspec.filesystem("memory").rm("/uninterrupted", recursive=True)


def test_killed_ray_worker_part_is_retried(ray_session, tmp_path):
    from curation.ray import RayExecutor

    write_copy_corpus(tmp_path / "src", originals=4, copies=1, seed=4)
    flag = tmp_path / "crashed"
    cfg = load_config(RunConfig, "curation/recipes/default.toml",
                      _overrides(tmp_path / "src", "crash_once_descriptor", str(flag)))  # fmt: skip
    run = str(tmp_path / "run")
    records = run_stages(cfg, run, RayExecutor())
    assert flag.exists()  # one embedding actor really died mid-part
    assert records["embed"]["out"] == 6 and records["embed"]["parts_computed"] == records["embed"]["parts"] == 3
    reference = "memory://no-crash"
    run_stages(cfg, reference, LocalExecutor())  # flag exists now: no crash in-process
    got, want = _parquets(run), _parquets(reference)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    fsspec.filesystem("memory").rm("/no-crash", recursive=True)
