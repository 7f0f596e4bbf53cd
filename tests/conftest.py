"""Shared test setup: Ray on loopback without auth, and one in-process Ray per test session."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A session-wide in-process Ray (2 CPUs, no dashboard, ~300 MB object store, private temp dir) shared by
    every Ray test, so no test calls ``ray.init`` twice in one process."""
    import ray

    if ray.is_initialized():
        yield
        return
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short path: Ray's unix sockets live under it
    pythonpath = str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 1024 * 1024,
        _temp_dir=tmp,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
