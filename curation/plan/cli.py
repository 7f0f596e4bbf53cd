"""``python -m curation plan``: the subcommand's arguments and the function behind it."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from curation.plan.model import Assumptions
from curation.plan.nodes import cluster_from_yaml, uniform_cluster
from curation.plan.plan import Plan, estimate_plan
from curation.plan.render import plan_dict, plan_text
from curation.plan.table import load_table

__all__ = ["add_plan_parser", "plan_cmd", "plan_output"]


def _assumptions(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--assume {item!r} must look like name=number, e.g. keep_fraction=0.85")
    return out


def plan_cmd(recipe: str, images: int, overrides: Sequence[str] = (), nodes: int = 1, cpus_per_node: int = 0,
             gpus_per_node: int = 0, cluster: str | None = None, assume: Sequence[str] = (),
             table: str | None = None) -> Plan:  # fmt: skip
    """Estimate RECIPE's cost for a pool of --images N files, per stage (wall time, GPU- and CPU-hours, peak memory
    per process, bytes written) and in total, on --nodes K x --cpus-per-node C (default: this machine's CPUs)
    x --gpus-per-node G, or on the worker nodes of a Ray cluster yaml (--cluster infra/ray/cluster.yaml), from the
    measured throughput table curation/plan/throughput.toml. Pool properties no setting fixes (the share dedupe
    keeps, candidate pairs per image, image size, seed images) come from the table's [funnel] unless given with
    --assume name=value."""
    from curation.cli import load_run_config

    tab = load_table(table)
    if cluster:
        if nodes != 1 or cpus_per_node or gpus_per_node:
            raise ValueError("give either --cluster or --nodes/--cpus-per-node/--gpus-per-node, not both")
        machines = cluster_from_yaml(cluster, tab.section("instances"))
    else:
        machines = uniform_cluster(nodes, cpus_per_node or os.cpu_count() or 1, gpus_per_node)
    cfg = load_run_config(recipe, overrides)
    return estimate_plan(cfg, images, machines, tab, Assumptions.from_table(tab, _assumptions(assume)), recipe)


def plan_output(args: argparse.Namespace) -> str:
    """What the subcommand prints for parsed ``args``."""
    plan = plan_cmd(args.recipe, args.images, args.overrides, args.nodes, args.cpus_per_node, args.gpus_per_node,
                    args.cluster, args.assume, args.table)  # fmt: skip
    return json.dumps(plan_dict(plan), indent=2) if args.json else plan_text(plan, steps=args.steps)


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``plan`` to the ``python -m curation`` subcommands."""
    p = sub.add_parser("plan", help=plan_cmd.__doc__, description=plan_cmd.__doc__)
    p.add_argument("recipe", help="TOML recipe (path, fsspec URL or built-in name such as 'sscd')")
    p.add_argument("--images", type=int, required=True, help="files in the pool")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a recipe field (repeatable), as for run")  # fmt: skip
    p.add_argument("--nodes", type=int, default=1, help="worker nodes (default 1)")
    p.add_argument("--cpus-per-node", type=int, default=0, help="CPUs per node (default: this machine's)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    p.add_argument("--cluster", default=None, metavar="YAML",
                   help="read the worker nodes from a Ray cluster launcher yaml or KubeRay RayCluster")  # fmt: skip
    p.add_argument("--assume", action="append", default=[], metavar="NAME=VALUE",
                   help="pool assumption (repeatable): unique_fraction, keep_fraction, candidates_per_image, "
                   "features_fraction, cc_rounds, image_bytes, seed_images")  # fmt: skip
    p.add_argument("--steps", action="store_true", help="one line per step under each stage")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--table", default=None, help="another throughput table (default: curation/plan/throughput.toml)")
