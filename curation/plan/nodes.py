"""The machines a plan runs on: node groups given on the command line or read from a Ray cluster yaml.

A Ray cluster launcher config (``infra/ray/cluster.yaml``) names an instance type per node type; its CPUs, GPUs and
memory come from the ``[instances]`` table of the throughput table unless the node type sets ``resources``. A
KubeRay ``RayCluster`` (``infra/ray/kuberay-raycluster.yaml``) gives them as container limits. Worker groups are
counted at their maximum size (what the autoscaler may reach); a head started with ``num-cpus 0`` / ``CPU: 0``
runs no tasks and is left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = ["Cluster", "NodeGroup", "cluster_from_yaml", "uniform_cluster"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class NodeGroup:
    """``count`` identical nodes."""

    name: str
    """Node type or group name (for the plan's header)."""
    count: int
    """Nodes of this shape."""
    cpus: int
    """CPUs Ray schedules on each node."""
    gpus: int = 0
    """GPUs on each node."""
    memory_gb: float = 0.0
    """Memory of each node (0 = unknown)."""

    def __post_init__(self) -> None:
        for name in ("count", "cpus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"nodes.{self.name}.{name} must be a positive integer, got {v!r}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ValueError(f"nodes.{self.name}.gpus must be an integer >= 0, got {self.gpus!r}")
        if self.memory_gb < 0:
            raise ValueError(f"nodes.{self.name}.memory_gb must be >= 0, got {self.memory_gb!r}")


@dataclass(kw_only=True, frozen=True)
class Cluster:
    """The node groups a run gets."""

    groups: tuple[NodeGroup, ...]
    source: str = "command line"

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("nodes: the cluster has no worker node that runs tasks")

    @property
    def nodes(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def cpus(self) -> int:
        return sum(g.count * g.cpus for g in self.groups)

    @property
    def gpus(self) -> int:
        return sum(g.count * g.gpus for g in self.groups)

    def slots(self, cpus_per_task: float, gpus_per_task: float = 0.0) -> int:
        """Tasks (or actors) that fit at once, node by node."""
        total = 0
        for g in self.groups:
            per_node = int(g.cpus // cpus_per_task) if cpus_per_task > 0 else 1 << 30
            if gpus_per_task > 0:
                per_node = min(per_node, int(g.gpus // gpus_per_task))
            total += g.count * per_node
        return total

    def describe(self) -> str:
        parts = [f"{g.count} x {g.name} ({g.cpus} CPUs" + (f", {g.gpus} GPUs" if g.gpus else "") + ")"
                 for g in self.groups]  # fmt: skip
        return f"{' + '.join(parts)} = {self.cpus} CPUs, {self.gpus} GPUs [{self.source}]"


def uniform_cluster(nodes: int, cpus_per_node: int, gpus_per_node: int = 0) -> Cluster:
    """``nodes`` identical nodes (``--nodes/--cpus-per-node/--gpus-per-node``)."""
    return Cluster(groups=(NodeGroup(name="node", count=nodes, cpus=cpus_per_node, gpus=gpus_per_node),))


def _int(value: Any, where: str) -> int:
    try:
        return int(float(str(value)))
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {value!r}") from None


def _memory_gb(value: Any) -> float:
    """``64Gi`` / ``128G`` / ``512Mi`` -> GB (0 when absent)."""
    if value is None:
        return 0.0
    text = str(value)
    for suffix, scale in (("Gi", 1.0), ("G", 1.0), ("Mi", 1 / 1024), ("M", 1 / 1024), ("Ti", 1024.0), ("T", 1024.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text) / 2**30


def _launcher_groups(doc: dict[str, Any], instances: dict[str, Any], where: str) -> list[NodeGroup]:
    groups = []
    head = doc.get("head_node_type")
    cap = doc.get("max_workers")
    for name, spec in (doc.get("available_node_types") or {}).items():
        resources = dict(spec.get("resources") or {})
        itype = (spec.get("node_config") or {}).get("InstanceType")
        shape = instances.get(itype, {}) if itype else {}
        cpus = resources.get("CPU", shape.get("cpus"))
        gpus = resources.get("GPU", shape.get("gpus", 0))
        if cpus is None:
            raise ValueError(f"{where}: node type {name!r} (InstanceType {itype!r}) has no CPU count: add the "
                             "instance type to [instances] of the throughput table or set resources: {CPU: N}")
        count = 1 if name == head else int(spec.get("max_workers", spec.get("min_workers", 0)))
        if cap is not None and name != head:
            count = min(count, int(cap))
        if int(cpus) == 0 or count == 0:
            continue
        groups.append(NodeGroup(name=f"{name}:{itype}" if itype else name, count=count, cpus=_int(cpus, where),
                                gpus=_int(gpus, where), memory_gb=float(shape.get("memory_gb", 0.0))))  # fmt: skip
    return groups


def _kuberay_groups(doc: dict[str, Any], where: str) -> list[NodeGroup]:
    spec = doc.get("spec") or {}
    groups = []
    head = spec.get("headGroupSpec") or {}
    worker_specs = [("head", head, 1)] + [(w.get("groupName", "workers"), w, int(w.get("maxReplicas",
                                           w.get("replicas", 0)))) for w in spec.get("workerGroupSpecs") or []]
    for name, group, count in worker_specs:
        params = group.get("rayStartParams") or {}
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        limits = (containers[0].get("resources") or {}).get("limits") or {}
        cpus = params.get("num-cpus", limits.get("cpu"))
        gpus = params.get("num-gpus", limits.get("nvidia.com/gpu", 0))
        if cpus is None or count == 0 or _int(cpus, where) == 0:
            continue
        groups.append(NodeGroup(name=name, count=count, cpus=_int(cpus, where), gpus=_int(gpus, where),
                                memory_gb=_memory_gb(limits.get("memory"))))  # fmt: skip
    return groups


def cluster_from_yaml(path: str, instances: dict[str, Any]) -> Cluster:
    """The worker node groups of a Ray cluster launcher yaml or a KubeRay ``RayCluster`` manifest."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a Ray cluster yaml")
    if doc.get("kind") == "RayCluster":
        groups = _kuberay_groups(doc, path)
    elif "available_node_types" in doc:
        groups = _launcher_groups(doc, instances, path)
    else:
        raise ValueError(f"{path}: neither a Ray cluster launcher config (available_node_types) nor a KubeRay "
                         "RayCluster")  # fmt: skip
    if not groups:
        raise ValueError(f"{path}: no node type runs tasks (every one has 0 CPUs or 0 nodes)")
    return Cluster(groups=tuple(groups), source=path)
