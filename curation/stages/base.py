"""Stage contract and executor interface (no Ray here: :mod:`curation.ray` implements the executor).

A stage splits its work into numbered parts. Each part is a pure function of the run config and the inputs:
the worker writes the part's data atomically, then its marker (:class:`curation.io.parts.PartStore`), and
returns the part's stats. The driver sums the stats and writes ``_SUCCESS.json`` last. Parts run through an
:class:`Executor`: plain tasks (``map``) or a pool of long-lived workers that load a model once (``map_actors``).
"""

from __future__ import annotations

import logging
import resource
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

from tqdm.auto import tqdm

from curation.config import RunConfig
from curation.io.parts import PartStore, code_version

__all__ = [
    "STAGES",
    "Executor",
    "LocalExecutor",
    "Stage",
    "merge_stats",
    "peak_rss_mb",
    "register_stage",
    "with_peak_rss",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

STAGES: dict[str, type[Stage]] = {}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def with_peak_rss(result: T, **extra: Any) -> T:
    """A part's stats with ``peak_rss_mb`` of the process that computed it (and ``extra``) added; an executor
    calls this on every part result, so part functions never measure themselves. Non-dict results pass as is."""
    if isinstance(result, dict):
        return {**result, "peak_rss_mb": peak_rss_mb(), **extra}  # type: ignore[return-value]
    return result


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator adding a stage to the registry under ``cls.name``."""
    if cls.name in STAGES and STAGES[cls.name] is not cls:
        raise ValueError(f"stage name {cls.name!r} registered twice")
    STAGES[cls.name] = cls
    return cls


class Executor(ABC):
    """Runs part functions somewhere; results come back as parts finish (any order)."""

    in_process: ClassVar[bool] = False
    """True when parts run in this process (so a ``memory://`` run directory is visible to them)."""

    @property
    @abstractmethod
    def num_cpus(self) -> int: ...

    @property
    @abstractmethod
    def num_gpus(self) -> int: ...

    @abstractmethod
    def map(self, fn: Callable[[T], R], items: Sequence[T], *, desc: str, num_cpus: float = 1) -> Iterator[R]:
        """``fn(item)`` for every item, as independent tasks."""

    @abstractmethod
    def map_actors(
        self,
        factory: Callable[[], Callable[[T], R]],
        items: Sequence[T],
        *,
        desc: str,
        concurrency: int,
        num_cpus: float = 1,
        num_gpus: float = 0,
    ) -> Iterator[R]:
        """``worker(item)`` on a pool of ``concurrency`` workers, each built once by ``factory()``."""


class LocalExecutor(Executor):
    """Runs everything in this process, in order (no Ray): for debugging and stage tests."""

    in_process = True

    @property
    def num_cpus(self) -> int:
        return 1

    @property
    def num_gpus(self) -> int:
        import torch

        return torch.cuda.device_count()

    def map(self, fn, items, *, desc, num_cpus=1):
        for item in tqdm(items, desc=desc, unit="part", leave=False):
            yield with_peak_rss(fn(item))

    def map_actors(self, factory, items, *, desc, concurrency, num_cpus=1, num_gpus=0):
        worker = factory() if items else None
        for item in tqdm(items, desc=desc, unit="part", leave=False):
            yield with_peak_rss(worker(item))


def merge_stats(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sum part stats: ``in``, ``out`` and ``rejected`` (by reason)."""
    rejected: Counter[str] = Counter()
    for p in parts:
        rejected.update(p.get("rejected", {}))
    return {
        "in": sum(int(p.get("in", 0)) for p in parts),
        "out": sum(int(p.get("out", 0)) for p in parts),
        "rejected": dict(sorted(rejected.items())),
    }


class Stage(ABC):
    """One resumable stage of a run. Subclasses set ``name``/``output`` and implement ``run``."""

    name: ClassVar[str]
    """Registry name (``python -m curation stage NAME``)."""
    output: ClassVar[str]
    """Primary output directory in the run directory; holds ``_SUCCESS.json``."""
    requires: ClassVar[tuple[str, ...]] = ()
    """Stages whose outputs this one reads."""
    items_step: ClassVar[str] = "main"
    """Step whose part ``in`` counts measure the stage's items/s."""

    def __init__(self, config: RunConfig, run_dir: str, prefix: str = "") -> None:
        self.config = config
        self.run_dir = run_dir
        self.prefix = prefix
        self.store = PartStore(run_dir, self.name, self.output, prefix)
        self._parts_total = 0
        self._parts_computed = 0
        self._items_computed = 0
        self._worker_peak: float | None = None  # max peak RSS of the processes that computed parts here
        self._nodes: set[str] = set()

    @abstractmethod
    def config_sections(self) -> tuple[Any, ...]:
        """Config sections whose change invalidates this stage's outputs."""

    @property
    def config_hash(self) -> str:
        from curation.config import config_hash

        return config_hash(self.name, self.prefix, *self.config_sections())

    @abstractmethod
    def run(self, executor: Executor) -> dict[str, Any]:
        """Do the work (skipping finished parts) and return stats with ``in``/``out``/``rejected``/``rows``."""

    def is_done(self) -> bool:
        return self.store.success(self.config_hash) is not None

    def execute(self, executor: Executor) -> dict[str, Any]:
        """Run unless already finished; write and return the ``_SUCCESS.json`` record. The record of a stage that
        had already finished is returned with ``"skipped": True`` (not written to the file): its ``seconds`` and
        ``parts_computed`` are those of the run that did the work."""
        label = f"{self.prefix}/{self.name}" if self.prefix else self.name
        done = self.store.success(self.config_hash)
        if done is not None:
            log.info("stage %s already finished (%s), skipping", label, self.store.success_url)
            return {**done, "skipped": True}
        for req in self.requires:
            req_stage = STAGES[req](self.config, self.run_dir, self.prefix)
            if not req_stage.is_done():
                raise ValueError(f"stage {self.name!r} needs stage {req!r} finished first in {self.run_dir}")
        t0 = time.perf_counter()
        stats = self.run(executor)
        seconds = time.perf_counter() - t0
        record = {
            "stage": self.name,
            "prefix": self.prefix,
            "config_hash": self.config_hash,
            "code_version": code_version(),
            "seconds": round(seconds, 3),
            "items_per_s": round(self._items_computed / max(seconds, 1e-9), 2),
            "parts": self._parts_total,
            "parts_computed": self._parts_computed,
            "parts_skipped": self._parts_total - self._parts_computed,
            "worker_peak_rss_mb": self._worker_peak,
            "driver_peak_rss_mb": peak_rss_mb(),
            **({"nodes": len(self._nodes)} if self._nodes else {}),
            **stats,
        }
        self.store.write_success(record)
        log.info(
            "stage %s done in %.1fs: in=%s out=%s rejected=%s (%.1f items/s, %d/%d parts computed)",
            label, seconds, stats.get("in"), stats.get("out"), stats.get("rejected"),
            record["items_per_s"], self._parts_computed, self._parts_total,
        )  # fmt: skip
        return record

    def run_parts(
        self,
        executor: Executor,
        step: str,
        n_parts: int,
        fn: Callable[[int], dict[str, Any]] | None = None,
        *,
        factory: Callable[[], Callable[[int], dict[str, Any]]] | None = None,
        concurrency: int = 1,
        num_cpus: float = 1,
        num_gpus: float = 0,
    ) -> list[dict[str, Any]]:
        """Run parts ``0..n_parts-1`` of ``step`` that have no marker; return every part's stats in order.

        ``fn(i)`` (tasks) or the workers built by ``factory`` (actor pool) write part ``i`` and its marker.
        """
        done = self.store.done(step, self.config_hash)
        pending = [i for i in range(n_parts) if i not in done]
        self._parts_total += n_parts
        self._parts_computed += len(pending)
        desc = f"{self.prefix + '/' if self.prefix else ''}{self.name}:{step}"
        if pending:
            log.info("%s: %d parts to compute, %d already done", desc, len(pending), n_parts - len(pending))
            if factory is not None:
                results = executor.map_actors(
                    factory, pending, desc=desc, concurrency=concurrency, num_cpus=num_cpus, num_gpus=num_gpus
                )
            else:
                assert fn is not None
                results = executor.map(fn, pending, desc=desc, num_cpus=num_cpus)
            for r in results:
                done[int(r["part"])] = r
                if "peak_rss_mb" in r:
                    self._worker_peak = max(self._worker_peak or 0.0, float(r["peak_rss_mb"]))
                if r.get("node_id"):
                    self._nodes.add(str(r["node_id"]))
                if step == self.items_step:
                    self._items_computed += int(r.get("in", 0))
        missing = [i for i in range(n_parts) if i not in done]
        assert not missing, f"parts {missing} of {desc} returned no result"
        return [done[i] for i in range(n_parts)]
