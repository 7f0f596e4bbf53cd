"""Connect to (or start) Ray for a run and hand back the executor.

``ray.address`` empty: inside ``ray job submit`` (``RAY_ADDRESS`` set by Ray) join that cluster, otherwise
start an in-process Ray on this machine, whose processes die with this one
(:mod:`curation.ray.watchdog`). ``auto`` or ``ray://host:10001`` connect to a running cluster.
``none`` runs everything in this process without Ray (debugging).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from curation.config import RayConfig
from curation.ray.watchdog import fate_share
from curation.stages.base import Executor, LocalExecutor

__all__ = ["executor_for"]

log = logging.getLogger(__name__)


@contextmanager
def executor_for(cfg: RayConfig) -> Iterator[Executor]:
    """Yield the executor for ``cfg``; an in-process Ray started here is shut down on exit."""
    if cfg.address == "none":
        yield LocalExecutor()
        return
    import ray

    from curation.ray.executor import RayExecutor

    with ExitStack() as stack:
        if not ray.is_initialized():
            env = {"env_vars": {"PYTHONPATH": _pythonpath()}}
            if cfg.address:
                log.info("connecting to Ray at %s", cfg.address)
                ray.init(address=cfg.address, log_to_driver=True)
            elif os.environ.get("RAY_ADDRESS"):
                log.info("joining the Ray cluster of this job (RAY_ADDRESS=%s)", os.environ["RAY_ADDRESS"])
                ray.init(log_to_driver=True)
            else:
                log.info("starting an in-process Ray (num_cpus=%s)", cfg.num_cpus or "all")
                stack.enter_context(fate_share())  # its workers and agents die with this process, even by SIGKILL
                ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False, runtime_env=env)
            stack.callback(ray.shutdown)  # before the watchdog is told to stop
        yield RayExecutor(cfg.max_in_flight)


def _pythonpath() -> str:
    """The repository root first, so in-process workers import this checkout's ``curation``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")
