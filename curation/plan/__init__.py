"""Cost plan of a curation run (``python -m curation plan``): per stage, the wall time, GPU- and CPU-hours, peak
memory per process and bytes written, for a pool size and a cluster, from the measured throughput table
``throughput.toml`` (:mod:`curation.plan.table`; measured by ``bench/plan_calibrate.py``)."""

from curation.plan.model import Assumptions, StageEstimate, Step
from curation.plan.nodes import Cluster, NodeGroup, cluster_from_yaml, uniform_cluster
from curation.plan.plan import Plan, estimate_plan
from curation.plan.render import plan_dict, plan_text
from curation.plan.table import ThroughputTable, load_table

__all__ = [
    "Assumptions",
    "Cluster",
    "NodeGroup",
    "Plan",
    "StageEstimate",
    "Step",
    "ThroughputTable",
    "cluster_from_yaml",
    "estimate_plan",
    "load_table",
    "plan_dict",
    "plan_text",
    "uniform_cluster",
]
