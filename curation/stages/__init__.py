"""Stage registry and the run driver. Importing this package registers every stage (ingest, embed, dedupe,
cluster, retrieve, shard, report); a new stage registers itself with :func:`register_stage` and is run by name.
"""

from __future__ import annotations

import logging
from typing import Any

from curation.config import RunConfig
from curation.stages.base import STAGES, Executor, LocalExecutor, Stage, merge_stats, register_stage
from curation.stages.cluster import ClusterStage
from curation.stages.dedupe import DedupeStage
from curation.stages.embed import EmbedStage
from curation.stages.ingest import IngestStage
from curation.stages.report import ReportStage
from curation.stages.retrieve import RetrieveStage
from curation.stages.shard import ShardStage

__all__ = [
    "STAGES",
    "ClusterStage",
    "DedupeStage",
    "EmbedStage",
    "Executor",
    "IngestStage",
    "LocalExecutor",
    "ReportStage",
    "RetrieveStage",
    "ShardStage",
    "Stage",
    "get_stage",
    "merge_stats",
    "register_stage",
    "run_stages",
]

log = logging.getLogger(__name__)


def get_stage(name: str) -> type[Stage]:
    """The registered stage class called ``name``."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    return STAGES[name]


def run_stages(config: RunConfig, run_dir: str, executor: Executor, names: list[str] | None = None) -> dict[str, Any]:
    """Run ``names`` (default: ``config.stages``) in order into ``run_dir``; return each stage's success record."""
    names = list(config.stages if names is None else names)
    if run_dir.startswith("memory://") and not executor.in_process:
        raise ValueError(
            f"run directory {run_dir} is a memory:// filesystem, private to this process; workers cannot see it. "
            "Use a local path or an object store URL, or run without Ray (--address none)"
        )
    classes = [get_stage(n) for n in names]  # fail on a typo before any work
    if config.base:
        from curation.io.chain import base_chain, local_abspath

        chain = base_chain(config)  # fails early on an unfinished or incompatible base
        if local_abspath(run_dir) in {b.run_dir for b in chain}:
            raise ValueError(f"run directory {run_dir} is a base run of this increment; base runs are read-only: "
                             "write the increment to a new directory")  # fmt: skip
        log.info("increment of %s (chain of %d runs)", config.base, len(chain))
    from curation.io.fs import atomic_write_bytes, join
    from pretrain.utils.config import dump_toml, to_dict

    atomic_write_bytes(join(run_dir, "config.toml"), dump_toml(to_dict(config)).encode())  # read by increments
    records = {}
    for cls in classes:
        records[cls.name] = cls(config, run_dir).execute(executor)
    return records
