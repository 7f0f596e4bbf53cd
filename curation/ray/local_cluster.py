"""A multi-node Ray cluster on this machine (head + N worker nodes on 127.0.0.1), for tests and benchmarks.

Every node is a separate ``ray start`` with its own temp dir (``--temp-dir`` may differ per node), its own
loopback ports (agents, metrics, node and object managers) and OS-chosen worker ports
(``--min-worker-port=0 --max-worker-port=0``), so several nodes and other people's Ray instances share the
machine without clashing. Only the head runs the dashboard (for ``ray job submit``) and the log monitor.

Stopping: ``ray stop`` would kill every Ray on the machine, so the cluster's processes are found in /proc by the
cluster's private temp root or its GCS address in their command line (plus all their descendants: Ray workers
rename themselves ``ray::...``) and terminated, then killed after a grace period.

    with LocalRayCluster(workers=2, cpus_per_node=1) as cluster:
        proc = cluster.submit(["run", "default", "--out", "/tmp/run"], timeout=300)
        print(cluster.process_peak_rss_mb())   # {"gcs": ..., "raylet": ..., "worker": ..., "driver": ...}

From a shell, ``python -m curation.ray.local_cluster stop /tmp/myray`` stops a head started with
``--temp-dir /tmp/myray`` the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["REPO", "LocalRayCluster", "free_ports", "main", "process_roles", "process_tree", "stop_processes"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "infra" / "ray" / "runtime_env.yaml"
ROLES = ("gcs", "raylet", "worker", "driver", "other")


# `ray start --address` (a worker node) with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 aborts ("multi-node clusters are
# not supported"); with =1 Ray rewrites every loopback address, --node-ip-address=127.0.0.1 included, to the
# machine's outward IP. So worker nodes start through the Ray CLI with only its multi-node gate opened: the CLI
# module sees ENABLE_RAY_CLUSTER=True, address resolution (ray._private.services) still sees 0 and keeps loopback.
_WORKER_RAY_START = """
import sys, types
import ray._private.ray_constants as constants
from ray.scripts import scripts
gate = types.ModuleType(constants.__name__)
gate.__dict__.update(constants.__dict__)
gate.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = gate
sys.exit(scripts.main())
"""


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (held open together so they differ)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _process_table() -> dict[int, tuple[int, str]]:
    """``pid -> (parent pid, command line)`` of every process readable in /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return table


def _matcher(markers: Sequence[str]) -> re.Pattern[str]:
    # a port marker "127.0.0.1:1234" must not match "127.0.0.1:12345"
    return re.compile("|".join(re.escape(m) + r"(?!\d)" for m in markers))


def _ancestors(table: dict[int, tuple[int, str]]) -> set[int]:
    """This process and its ancestors (a shell whose command line names a marker is not the cluster's)."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        pid = table[pid][0] if pid in table else 1
    return out


def _tree(table: dict[int, tuple[int, str]], markers: Sequence[str]) -> set[int]:
    pattern = _matcher(markers)
    mine = _ancestors(table)
    found = {pid for pid, (_, cmd) in table.items() if pattern.search(cmd) and pid not in mine}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in found and pid not in found and pid not in mine:
                found.add(pid)
                grew = True
    return found


def process_tree(markers: Sequence[str]) -> set[int]:
    """Pids whose command line contains one of ``markers`` (a private temp dir or port), plus descendants; never
    this process or its ancestors."""
    return _tree(_process_table(), markers)


def stop_processes(markers: Sequence[str], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every process found by :func:`process_tree`.

    This is how a Ray started by tests or benchmarks is stopped: ``ray stop`` would kill every Ray of the user on
    the machine.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in process_tree(markers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline and process_tree(markers):
            time.sleep(0.2)
        if not process_tree(markers):
            return


def _classify(cmd: str) -> str | None:
    """Role of a Ray process from its command line; None when it is not recognisable on its own."""
    head = cmd.split(" ", 1)[0]
    if head.endswith("gcs_server"):
        return "gcs"
    if head.endswith("/raylet"):
        return "raylet"
    if " -m curation " in f" {cmd} ":
        return "driver"
    if cmd.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):  # per-node agents, not workers
        return "other"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "worker"
    return None


def process_roles(markers: Sequence[str]) -> dict[int, str]:
    """``pid -> role`` (gcs, raylet, worker, driver, other) of every process of :func:`process_tree`; an
    unrecognised child of a driver or worker (a decode pool) takes its parent's role, anything else (dashboard,
    agents) is ``other``."""
    table = _process_table()
    pids = _tree(table, markers)
    roles: dict[int, str] = {}

    def role(pid: int) -> str:
        if pid not in roles:
            own = _classify(table[pid][1])
            parent = table[pid][0]
            inherited = role(parent) if parent in pids and parent != pid else "other"
            roles[pid] = own or (inherited if inherited in ("driver", "worker") else "other")
        return roles[pid]

    for pid in pids:
        role(pid)
    return roles


def _vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (``VmHWM``) of a live process in MiB; None if it is gone or not readable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class LocalRayCluster:
    """Context manager: a Ray head and ``workers`` worker nodes on 127.0.0.1, stopped (only them) on exit.

    ``head_cpus`` defaults to 0 so every task and actor runs on the worker nodes (the job's driver needs none).
    While the cluster runs, a thread samples the peak RSS of its processes every ``sample_s`` seconds, so the
    peaks of workers that have exited by the time :meth:`process_peak_rss_mb` is called still count.
    """

    def __init__(
        self,
        workers: int = 2,
        cpus_per_node: int = 1,
        memory_bytes: int = 2 * 1024**3,
        object_store_bytes: int = 200 * 1024**2,
        temp_root: str | None = None,
        head_cpus: int = 0,
        python: str = sys.executable,
        start_timeout: float = 180.0,
        sample_s: float = 0.5,
    ) -> None:
        self.workers = workers
        self.cpus_per_node = cpus_per_node
        self.memory_bytes = memory_bytes
        self.object_store_bytes = object_store_bytes
        self.temp_root = temp_root or "/tmp"  # short: Ray's unix sockets live under the temp dir
        self.head_cpus = head_cpus
        self.python = python
        self.start_timeout = start_timeout
        self.sample_s = sample_s
        bin_dir = str(Path(python).parent)
        self.ray_bin = str(Path(bin_dir) / "ray")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_ID")}
        env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                   RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # fmt: skip
        self.env: dict[str, str] = env
        """Environment for Ray CLI calls against this cluster (the venv first on PATH, no usage stats)."""
        self.root = ""
        self.gcs_address = ""
        self.dashboard_url = ""
        self._markers: list[str] = []
        self._peaks: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalRayCluster:
        self.root = tempfile.mkdtemp(prefix="rcl-", dir=self.temp_root)
        gcs, dash, client, *head_ports = free_ports(9)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        self._markers = [self.root, self.gcs_address]
        try:
            head = [
                "--head", "--port", str(gcs), "--num-cpus", str(self.head_cpus), "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
            ]  # fmt: skip
            self._ray_start("head", head, head_ports, self.head_cpus)
            procs = [
                self._ray_start(f"w{i}", ["--address", self.gcs_address, "--include-log-monitor=False"],
                                free_ports(6), self.cpus_per_node, wait=False)  # fmt: skip
                for i in range(1, self.workers + 1)
            ]
            for name, proc in procs:
                self._wait_started(name, proc)
            self._wait_alive(1 + self.workers)
        except BaseException:
            self._shutdown()
            raise
        self._sampler = threading.Thread(target=self._sample_loop, name="rss-sampler", daemon=True)
        self._sampler.start()
        log.info("local Ray cluster up: head + %d workers, GCS %s, dashboard %s, temp %s",
                 self.workers, self.gcs_address, self.dashboard_url, self.root)  # fmt: skip
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._shutdown()
        survivors = process_tree(self._markers)
        assert not survivors, f"processes of the local Ray cluster survived: {sorted(survivors)}"

    def _ray_start(
        self, name: str, args: list[str], ports: list[int], cpus: int, wait: bool = True
    ) -> tuple[str, subprocess.Popen[str]]:
        agent, agent_grpc, metrics, rt_agent, node_mgr, obj_mgr = ports
        temp = os.path.join(self.root, name)
        ray = [self.ray_bin] if "--head" in args else [self.python, "-c", _WORKER_RAY_START]
        cmd = [
            *ray, "start", *args, "--node-ip-address=127.0.0.1", "--temp-dir", temp,
            "--num-cpus", str(cpus), "--memory", str(self.memory_bytes),
            "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_agent),
            "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
            "--min-worker-port=0", "--max-worker-port=0",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if wait:
            self._wait_started(name, proc)
        return name, proc

    def _wait_started(self, name: str, proc: subprocess.Popen[str]) -> None:
        try:
            out, _ = proc.communicate(timeout=self.start_timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            out, _ = proc.communicate()
            raise RuntimeError(f"ray start ({name}) timed out after {self.start_timeout:.0f}s:\n{out[-3000:]}") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed with code {proc.returncode}:\n{out[-3000:]}")

    def _wait_alive(self, n: int) -> None:
        from ray.util.state import list_nodes

        deadline = time.time() + self.start_timeout
        alive: list[Any] = []
        while time.time() < deadline:
            with contextlib.suppress(Exception):  # the dashboard's state API takes a moment to come up
                alive = list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], timeout=10)
            if len(alive) >= n:
                ips = {node.node_ip for node in alive}
                if ips != {"127.0.0.1"}:
                    raise RuntimeError(f"Ray nodes left loopback: node IPs {sorted(ips)}")
                return
            time.sleep(0.5)
        raise RuntimeError(f"only {len(alive)} of {n} Ray nodes alive after {self.start_timeout:.0f}s")

    def _shutdown(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=10)
        if self._markers:
            stop_processes(self._markers)
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- use ---------------------------------------------------------------------------------------------------
    def submit(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """``ray job submit`` of ``<python> -m curation ARGS`` (the repository as working dir, the runtime env
        of infra/ray); waits for the job and returns the CLI's result (return code 1 when the job failed)."""
        cmd = [
            self.ray_bin, "job", "submit", "--address", self.dashboard_url, "--working-dir", ".",
            "--runtime-env", str(RUNTIME_ENV.relative_to(REPO)), "--", self.python, "-m", "curation", *args,
        ]  # fmt: skip
        log.info("submitting: %s", " ".join(cmd))
        return subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def _sample(self) -> None:
        roles = process_roles(self._markers)
        with self._lock:
            for pid, role in roles.items():
                hwm = _vm_hwm_mb(pid)
                if hwm is None:
                    continue
                old = self._peaks.get(pid)
                # a pid keeps its most specific role (a worker starts as a plain python process)
                keep_role = old[0] if old and role == "other" else role
                self._peaks[pid] = (keep_role, max(hwm, old[1] if old else 0.0))

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.sample_s):
            try:
                self._sample()
            except Exception:  # never let sampling kill the cluster; log and keep going
                log.exception("sampling the cluster's process RSS failed")

    def process_peak_rss_mb(self) -> dict[str, float]:
        """Largest peak RSS (VmHWM, MiB) of the cluster's processes by role: ``gcs``, ``raylet``, ``worker`` (Ray
        worker processes: tasks, actors, the job supervisor), ``driver`` (the job's ``python -m curation``),
        ``other`` (dashboard, agents); over every process seen since the cluster started."""
        self._sample()
        out: dict[str, float] = {}
        with self._lock:
            for role, peak in self._peaks.values():
                out[role] = round(max(out.get(role, 0.0), peak), 1)
        return {r: out[r] for r in ROLES if r in out}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curation.ray.local_cluster stop MARKER...``: stop the Ray processes whose command line names a
    marker (a head's ``--temp-dir`` or its GCS ``127.0.0.1:PORT``) and their descendants, nothing else."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "stop":
        print(main.__doc__, file=sys.stderr)
        return 2
    table = _process_table()
    markers = args[1:]
    named = {gcs for pid in _tree(table, markers) for gcs in re.findall(r"--gcs[-_]address=(\S+)", table[pid][1])}
    markers += sorted(named - set(markers))  # a head's Ray client server names only its GCS address
    found = process_tree(markers)
    stop_processes(markers)
    left = process_tree(markers)
    print(f"stopped {len(found - left)} processes" + (f"; still running: {sorted(left)}" if left else ""))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
