"""How a plan turns steps into wall time, CPU- and GPU-hours on a cluster, and the pool assumptions it rests on.

A stage is a list of :class:`Step` s, one per ``run_parts`` call of the stage (or a few identical calls), each
with its number of tasks, their busy CPU- (and GPU-) seconds and what they hold and write
(:mod:`curation.plan.stages` builds them from the recipe's settings, the same way the stages plan their parts).
A step runs its tasks in waves on the slots the cluster has for them (:meth:`curation.plan.nodes.Cluster.slots`):

    wall = calls x (ray.step_s + waves x (task seconds + ray.task_s)) + start_s,   waves = ceil(tasks / slots)

where task seconds are the step's CPU-seconds (plus ``reads x io.read_s``) per task over its threads, or its
GPU-seconds per task, whichever is longer,

and a stage adds its fixed driver overhead (``overhead.<stage>``: measured wall minus this model at calibration).
CPU-hours are busy CPU time (the tasks' own seconds); GPU-hours are GPUs held by a GPU step for its wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from curation.plan.nodes import Cluster
from curation.plan.table import ThroughputTable

__all__ = ["Assumptions", "StageEstimate", "Step", "run_step"]


@dataclass(kw_only=True)
class Step:
    """One step of a stage: ``calls`` ``run_parts`` calls of ``tasks`` tasks each (work spread evenly)."""

    name: str
    tasks: int
    cpu_s: float = 0.0
    """Busy CPU-seconds of all tasks of all calls."""
    gpu_s: float = 0.0
    """Busy GPU-seconds of all tasks (GPU actors)."""
    threads: float = 1.0
    """CPUs one task keeps busy at once (faiss threads, an actor's decode processes)."""
    cpus_per_task: float = 1.0
    """CPUs Ray reserves per task or actor."""
    gpus_per_task: float = 0.0
    """GPUs Ray reserves per actor."""
    max_slots: int = 0
    """Most tasks at once (an actor pool's size); 0 = as many as the cluster fits."""
    calls: int = 1
    """Identical ``run_parts`` calls (component rounds)."""
    reads: float = 0.0
    """Files (or row groups of bucketed shuffle files) opened by all tasks: a reduce task of a bucketed shuffle
    reads its row group of every map file, so a shuffle of M maps and R reduces costs M x R reads."""
    start_s: float = 0.0
    """Once per step: actor start (model load)."""
    rss_mb: float = 0.0
    """Peak resident memory of one task's process."""
    written: float = 0.0
    """Bytes of the stage's outputs this step writes (kept)."""
    scratch: float = 0.0
    """Bytes of step data written under ``_work/`` and deleted when the stage finishes."""

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.calls < 1:
            raise ValueError(f"step {self.name}: tasks and calls must be >= 1 (got {self.tasks}, {self.calls})")


@dataclass(kw_only=True)
class StepCost:
    """A step's cost on a given cluster."""

    step: Step
    slots: int
    wall_s: float
    gpu_h: float
    cpu_s: float
    """Busy CPU-seconds: the step's own plus its reads."""


def run_step(step: Step, cluster: Cluster, table: ThroughputTable) -> StepCost:
    """Wall time and GPU-hours of ``step`` on ``cluster`` (formula in the module docstring)."""
    fit = cluster.slots(step.cpus_per_task, step.gpus_per_task)
    if step.max_slots:
        fit = min(fit, step.max_slots)
    if fit < 1:
        need = f"{step.gpus_per_task:g} GPU and " if step.gpus_per_task else ""
        raise ValueError(f"step {step.name}: no node of the cluster fits a task of {need}{step.cpus_per_task:g} CPUs")
    par = min(fit, step.tasks)
    waves = math.ceil(step.tasks / par)
    per_call = step.tasks * step.calls
    cpu_s = step.cpu_s + step.reads * table.value("io.read_s")
    task_s = max(cpu_s / per_call / max(step.threads, 1e-9), step.gpu_s / per_call)
    ray_step, ray_task = table.value("ray.step_s"), table.value("ray.task_s")
    wall = step.calls * (ray_step + waves * (task_s + ray_task)) + step.start_s
    gpu_h = par * step.gpus_per_task * wall / 3600.0
    return StepCost(step=step, slots=par, wall_s=wall, gpu_h=gpu_h, cpu_s=cpu_s)


@dataclass(kw_only=True)
class StageEstimate:
    """One stage of the plan."""

    name: str
    images_in: float
    images_out: float
    steps: list[StepCost]
    overhead_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return self.overhead_s + sum(c.wall_s for c in self.steps)

    @property
    def cpu_h(self) -> float:
        return sum(c.cpu_s for c in self.steps) / 3600.0

    @property
    def gpu_h(self) -> float:
        return sum(c.gpu_h for c in self.steps)

    @property
    def rss_mb(self) -> float:
        return max((c.step.rss_mb for c in self.steps), default=0.0)

    @property
    def written(self) -> float:
        return sum(c.step.written for c in self.steps)

    @property
    def scratch(self) -> float:
        return sum(c.step.scratch for c in self.steps)

    def slowest(self) -> StepCost | None:
        return max(self.steps, key=lambda c: c.wall_s, default=None)


@dataclass(kw_only=True)
class Assumptions:
    """Properties of the pool that no setting fixes; defaults from the ``[funnel.*]`` sections of the throughput
    table, each replaceable with ``--assume name=value``."""

    unique_fraction: float
    """Ingested files that are readable, accepted and not exact duplicates."""
    keep_fraction: float
    """Embedded images dedupe keeps (not copies, not contaminated)."""
    candidates_per_image: float
    """With verification: candidate pairs per image before the ``dedupe.max_candidates`` cap."""
    features_fraction: float
    """With verification: images in at least one candidate pair (their features are extracted)."""
    cc_rounds: float
    """Rounds of the connected-components steps."""
    image_bytes: float
    """Mean bytes of one image file (sources and shards)."""
    seed_images: float = 0.0
    """Images of the recipe's seed sets together (retrieve)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"assume.{f.name} must be a number >= 0, got {v!r}")
        for name in ("unique_fraction", "keep_fraction", "features_fraction"):
            if getattr(self, name) > 1:
                raise ValueError(f"assume.{name} is a fraction: it must be in [0, 1], got {getattr(self, name)}")
        if self.cc_rounds < 1:
            raise ValueError(f"assume.cc_rounds must be >= 1, got {self.cc_rounds}")

    @classmethod
    def from_table(cls, table: ThroughputTable, overrides: dict[str, float] | None = None) -> Assumptions:
        """Defaults from ``funnel.*`` of ``table``, then ``overrides`` (``--assume``)."""
        names = [f.name for f in fields(cls)]
        found = {k.rsplit(".", 1)[1]: k for k in table.figures if k.startswith("funnel.")}
        values: dict[str, float] = {n: table.value(found[n]) for n in names if n in found}
        for key, value in (overrides or {}).items():
            if key not in names:
                raise ValueError(f"--assume {key}: unknown assumption; known: {', '.join(names)}")
            values[key] = value
        return cls(**values)
