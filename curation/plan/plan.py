"""``estimate_plan``: the cost of a recipe's stages on a cluster, stage by stage, and the plan's warnings.

The work is a fixed number of arithmetic operations per stage (no file is read but the recipe and the throughput
table, whatever the image count), so a plan for billions of images prints at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from curation.config import RunConfig
from curation.plan.model import Assumptions, StageEstimate, run_step
from curation.plan.nodes import Cluster
from curation.plan.stages import STAGE_STEPS, flow_of
from curation.plan.table import ThroughputTable

__all__ = ["Plan", "estimate_plan"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Plan:
    """A plan: the stages in run order, the cluster, the assumptions and what the reader must know."""

    recipe: str
    images: int
    cluster: Cluster
    assume: Assumptions
    stages: list[StageEstimate]
    notes: list[str] = field(default_factory=list)
    estimates: list[str] = field(default_factory=list)
    """Figures used that were not measured (``section.key: basis``)."""

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.stages)

    @property
    def cpu_h(self) -> float:
        return sum(s.cpu_h for s in self.stages)

    @property
    def gpu_h(self) -> float:
        return sum(s.gpu_h for s in self.stages)

    @property
    def allocated_gpu_h(self) -> float:
        """GPU-hours when every GPU of the cluster is held for the whole run (how a reservation is billed)."""
        return self.cluster.gpus * self.wall_s / 3600.0

    @property
    def node_h(self) -> float:
        return self.cluster.nodes * self.wall_s / 3600.0


def _notes(cfg: RunConfig, stage: StageEstimate, cluster: Cluster) -> list[str]:
    notes = []
    slow = stage.slowest()
    if slow is not None and slow.slots == 1 and stage.wall_s > 60 and slow.wall_s > 0.5 * stage.wall_s:
        hint = ""
        if slow.step.name.startswith("train (IVF"):
            hint = ("; its cost grows with the square of the IVF lists (images x dedupe.replicas / dedupe.list_rows): "
                    "raise dedupe.list_rows")  # fmt: skip
        elif slow.step.name.startswith("train (k-means"):
            hint = "; it runs on cluster.train_cpus threads of one node: raise cluster.train_cpus"
        notes.append(f"{stage.name}: step '{slow.step.name}' is a single task and takes {slow.wall_s / 3600:.3g} h "
                     f"of the stage's {stage.wall_s / 3600:.3g} h: more nodes do not shorten it{hint}")  # fmt: skip
    memory = min((g.memory_gb for g in cluster.groups if g.memory_gb), default=0.0)
    for c in stage.steps:
        if memory and c.step.rss_mb > memory * 1024:
            notes.append(f"{stage.name}: step '{c.step.name}' needs {c.step.rss_mb / 1024:.3g} GB in one process, "
                         f"more than a node's {memory:g} GB")  # fmt: skip
    if stage.name == "embed":
        held = max(c.slots for c in stage.steps)
        if any(c.step.gpus_per_task for c in stage.steps) and held < cluster.gpus:
            notes.append(f"embed: {held} of the cluster's {cluster.gpus} GPUs embed (embed.num_actors="
                         f"{cfg.embed.num_actors}); --set embed.num_actors={cluster.gpus} uses them all")  # fmt: skip
    return notes


def estimate_plan(cfg: RunConfig, images: int, cluster: Cluster, table: ThroughputTable,
                  assume: Assumptions, recipe: str = "") -> Plan:  # fmt: skip
    """Plan the recipe's stages (``cfg.stages``, in order) for a pool of ``images`` files on ``cluster``."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ValueError(f"--images must be a positive integer, got {images!r}")
    unknown = [s for s in cfg.stages if s not in STAGE_STEPS]
    if unknown:
        raise ValueError(f"stages {unknown}: the plan knows {', '.join(STAGE_STEPS)}")
    table.used_estimates.clear()
    flow = flow_of(cfg, images, assume)
    ins = {"ingest": (flow.files, flow.unique), "embed": (flow.unique, flow.unique),
           "dedupe": (flow.unique, flow.kept), "cluster": (flow.kept, flow.balanced or flow.kept),
           "retrieve": (flow.kept, flow.selected), "shard": (flow.selected, flow.selected),
           "report": (flow.unique, flow.unique)}  # fmt: skip
    stages = []
    for name in cfg.stages:
        steps = STAGE_STEPS[name](cfg, flow, table, assume, cluster)
        est = StageEstimate(name=name, images_in=ins[name][0], images_out=ins[name][1],
                            steps=[run_step(s, cluster, table) for s in steps],
                            overhead_s=table.value(f"overhead.{name}"))  # fmt: skip
        est.notes = _notes(cfg, est, cluster)
        stages.append(est)
    notes = [n for s in stages for n in s.notes]
    d = cfg.dedupe
    if "dedupe" in cfg.stages and (d.references or d.background):
        notes.append("dedupe: reference and background sets are not planned (their ingest and embed come on top)")
    if "retrieve" in cfg.stages and any(s.method == "cluster" for s in cfg.retrieve.seeds):
        notes.append("retrieve: cluster-method seed sets are planned like knn sets (n_per_seed per seed)")
    if "retrieve" in cfg.stages and cfg.retrieve.seeds and not assume.seed_images:
        notes.append("retrieve: the seed sets' size is unknown: give it with --assume seed_images=N")
    estimates = sorted(table.used_estimates)
    bases = [f"{name}: {table.figures[name].value:g} ({table.figures[name].basis})" for name in estimates]
    log.debug("plan %s: %d stages, %.0f s", recipe, len(stages), sum(s.wall_s for s in stages))
    return Plan(recipe=recipe or cfg.name, images=images, cluster=cluster, assume=assume, stages=stages, notes=notes,
                estimates=bases)  # fmt: skip
