"""curation.ray.watchdog: what a driver starts inside ``fate_share()`` dies with it, and only that."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import REPO

_DRIVER = """
import subprocess, sys, time
from curation.ray.watchdog import fate_share
with fate_share():
    child = subprocess.Popen(["sleep", "120"], start_new_session=True)  # re-parented to init when we die
    print(child.pid, flush=True)
    if sys.argv[1] == "die":
        time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _driver(mode: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, mode], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def test_killed_driver_takes_its_marked_processes_along():
    driver, child = _driver("die")
    try:
        time.sleep(1.0)  # the watchdog has seen the child
        driver.kill()
        driver.wait()
        deadline = time.time() + 10
        while _running(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not _running(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_clean_exit_kills_nothing():
    driver, child = _driver("exit")
    try:
        assert driver.wait(timeout=30) == 0
        time.sleep(1.5)
        assert _running(child)  # the driver left the block normally: the watchdog stood down
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
