"""Ray executor: parts as Ray tasks (bounded in flight, retried), model workers as a Ray Data actor pool.

Every part result comes back with ``peak_rss_mb`` (peak RSS of the worker process) and ``node_id``.

``map`` submits one task per part with ``max_retries`` so a killed worker's part is simply run again (the part
writes atomically and its marker last, so a retry is harmless). ``map_actors`` runs
``ray.data.from_items(parts).map_batches(<worker class>, batch_size=1, concurrency=N, num_gpus=...)``: each actor
builds its worker (loads the model) once in its constructor; actors are restarted and their part retried if
they die.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
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


class _ActorWorker:
    """Ray Data callable class: builds the worker once, then maps ``{"item": [...]}`` batches through it."""

    def __init__(self, factory: Callable[[], Callable[[Any], dict[str, Any]]]) -> None:
        self.worker = factory()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [json.dumps(_measured(self.worker(int(i)))) for i in batch["item"]]
        return {"result": np.array(results, dtype=object)}


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
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"item": int(i)} for i in items], override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(
            _ActorWorker,
            fn_constructor_args=(factory,),
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )  # Ray Data restarts dead actors and retries their part (max_restarts=-1, max_task_retries=-1)
        log.info("%s: %d parts on %d actors (%s CPU, %s GPU each)", desc, len(items), concurrency, num_cpus, num_gpus)
        with tqdm(total=len(items), desc=desc, unit="part", leave=False) as bar:
            for row in ds.iter_rows():
                bar.update(1)
                yield json.loads(row["result"])
