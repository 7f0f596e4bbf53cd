"""Fate-sharing for an in-process Ray: its processes go away when the driver is killed.

Why: ``ray.init(address="local")`` makes the driver the parent of the GCS server and the raylet, which
fate-share with it (they exit within a second or two of a SIGKILL). Everything else is a child of the raylet:
worker processes (``ray::IDLE``, actors) notice the raylet's death only through their sockets, and the dashboard
and runtime-env agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) see it, re-parented to init, but then
block up to a minute reporting it to the dead GCS before they exit. Nothing of Ray's own shortens that (Ray's
subreaper option makes the raylet reap its workers' children, and the raylet is the one that died).

How: :func:`fate_share` marks the driver's environment with a random token before ``ray.init`` (every Ray
process started from this driver inherits it: the GCS and raylet from the driver, workers and agents from the
raylet) and starts this module as a small separate process (its own session, stdlib only, not marked). It
polls the driver; when the driver is gone without having said ``stop`` (a clean exit after ``ray.shutdown``),
it SIGKILLs every process whose environment carries the token, until none is left, and exits. A process of
another Ray or another user never carries the token, so nothing else is touched.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ENV", "fate_share", "marked_processes"]

ENV = "CURATION_RAY_FATE"
"""Environment variable whose value marks the processes of one driver's in-process Ray."""


def _start_time(pid: int) -> str | None:
    """Start time of a live (not zombie) process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def marked_processes(token: str) -> set[int]:
    """Pids (other than this process) whose environment holds ``CURATION_RAY_FATE=token`` right now."""
    mark = f"{ENV}={token}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if mark in env.split(b"\0"):
            found.add(int(entry))
    return found


def _seen(token: str, seen: dict[int, str]) -> None:
    """Add the marked processes alive now to ``seen`` (pid -> start time).

    Remembered because the mark does not stay readable: ``/proc/PID/environ`` shows the memory where the process
    started with its environment, and a Ray process renaming itself (``setproctitle``) may overwrite it later.
    """
    for pid in marked_processes(token):
        born = _start_time(pid)
        if born is not None:
            seen[pid] = born


def _kill_marked(token: str, seen: dict[int, str], settle: float = 1.0, limit: float = 30.0) -> int:
    """SIGKILL the processes marked now or seen marked (same start time) until none was left for ``settle``
    seconds (a dying raylet may still fork); returns how many were killed."""
    killed: set[int] = set()
    quiet_since, deadline = time.monotonic(), time.monotonic() + limit
    while time.monotonic() - quiet_since < settle and time.monotonic() < deadline:
        _seen(token, seen)
        pids = {p for p, born in seen.items() if _start_time(p) == born}
        if pids:
            quiet_since = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        time.sleep(0.05)
    return len(killed)


def watch(driver: int, token: str, poll: float = 0.5) -> int:
    """Wait for ``driver`` to end; unless it wrote ``stop`` on our stdin first, kill its marked processes."""
    born = _start_time(driver)
    seen: dict[int, str] = {}
    reading = True
    while born is not None and _start_time(driver) == born:
        _seen(token, seen)
        seen = {p: t for p, t in seen.items() if _start_time(p) == t}  # forget the ones that ended
        if not reading:
            time.sleep(poll)
            continue
        ready, _, _ = select.select([sys.stdin], [], [], poll)
        if ready:
            line = sys.stdin.readline()
            if line.strip() == "stop":
                return 0
            reading = bool(line)  # EOF: the pipe closed; keep polling the pid
    n = _kill_marked(token, seen)
    print(f"curation.ray.watchdog: driver {driver} died; killed {n} processes of its Ray", file=sys.stderr)
    return 0


@contextlib.contextmanager
def fate_share() -> Iterator[str]:
    """Within this block, processes started from this process die with it: enter before ``ray.init``, leave
    after ``ray.shutdown``. Yields the token (see :func:`marked_processes`)."""
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != ENV}
    proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), token],
                            stdin=subprocess.PIPE, env=env, start_new_session=True, text=True)  # fmt: skip
    old = os.environ.get(ENV)
    os.environ[ENV] = token
    try:
        yield token
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the driver's terminal is the driver's business
    sys.exit(watch(int(sys.argv[1]), sys.argv[2]))
