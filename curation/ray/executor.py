"""Ray executor: parts as Ray tasks (bounded in flight, retried), model workers as a pool of Ray actors.

Every part result comes back with ``peak_rss_mb`` (peak RSS of the worker process) and ``node_id``.

``map`` submits one task per part with ``max_retries`` so a killed worker's part is simply run again (the part
writes atomically and its marker last, so a retry is harmless). ``map_actors`` starts ``concurrency`` actors
(``num_cpus``/``num_gpus`` each) and keeps one part in flight per actor; each actor builds its worker (loads the
model) on its first part. Actors are restarted and their part retried if they die (``max_restarts=-1``,
``max_task_retries=-1``). The factory travels with each call (one ``ray.put``), not as a constructor argument:
Ray logs an error for every restartable actor whose constructor arguments live in the object store (Ray Data's
``map_batches`` actor pool does that on every run), because a lost argument would make the restart fail.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import ray
from tqdm.auto import tqdm

from curation.stages.base import Executor, with_peak_rss

__all__ = ["RayExecutor"]

log = logging.getLogger(__name__)


def _measured(result: Any) -> Any:
    """A part result with the worker's peak RSS and the id of the node it ran on."""
    return with_peak_rss(result, node_id=ray.get_runtime_context().get_node_id())


def _call(fn: Callable[[Any], Any], item: Any) -> Any:
    return _measured(fn(item))


class _PoolWorker:
    """Ray actor of :meth:`RayExecutor.map_actors`: builds the worker from the factory on its first part."""

    def __init__(self) -> None:
        self.worker: Callable[[Any], dict[str, Any]] | None = None

    def run(self, factory: Callable[[], Callable[[Any], dict[str, Any]]], item: Any) -> dict[str, Any]:
        if self.worker is None:  # once per actor process, again after a restart
            self.worker = factory()
        return _measured(self.worker(item))


class RayExecutor(Executor):
    """Runs stage parts on the Ray cluster this process is connected to."""

    def __init__(self, max_in_flight: int = 0, max_retries: int = 3) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RayExecutor needs ray.init() first (use curation.ray.executor_for)")
        self.max_in_flight = max_in_flight or 2 * max(1, self.num_cpus)
        self.max_retries = max_retries

    @property
    def num_cpus(self) -> int:
        return int(ray.cluster_resources().get("CPU", 1))

    @property
    def num_gpus(self) -> int:
        return int(ray.cluster_resources().get("GPU", 0))

    def map(self, fn, items, *, desc, num_cpus=1):
        remote = ray.remote(_call).options(num_cpus=num_cpus, max_retries=self.max_retries, retry_exceptions=False)
        fn_ref = ray.put(fn)
        pending: list[ray.ObjectRef] = []
        queue = deque(items)
        with tqdm(total=len(queue), desc=desc, unit="part", leave=False) as bar:
            while queue or pending:
                while queue and len(pending) < self.max_in_flight:
                    pending.append(remote.remote(fn_ref, queue.popleft()))
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    bar.update(1)
                    yield ray.get(ref)

    def map_actors(self, factory, items: Sequence[int], *, desc, concurrency, num_cpus=1, num_gpus=0):
        cls = ray.remote(_PoolWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1,
                                              max_task_retries=-1)  # fmt: skip
        queue = deque(items)
        actors = [cls.remote() for _ in range(max(1, min(concurrency, len(queue))))]
        log.info("%s: %d parts on %d actors (%s CPU, %s GPU each)", desc, len(items), len(actors), num_cpus, num_gpus)
        factory_ref = ray.put(factory)
        pending: dict[ray.ObjectRef, Any] = {}
        try:
            with tqdm(total=len(queue), desc=desc, unit="part", leave=False) as bar:
                idle = list(actors)
                while queue or pending:
                    while queue and idle:
                        actor = idle.pop()
                        pending[actor.run.remote(factory_ref, queue.popleft())] = actor
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        idle.append(pending.pop(ref))
                        bar.update(1)
                        yield ray.get(ref)
        finally:
            for actor in actors:  # free their CPUs/GPUs now, not when the handles are collected
                ray.kill(actor)
