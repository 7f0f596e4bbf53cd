"""Incremental runs: the chain of base runs an increment builds on (read-only to the increment).

A run with ``base = "RUN"`` (``python -m curation run RECIPE --out NEW --base RUN``) is an *increment*: it ingests
and embeds only its own sources and compares them with every image of the chain ``root -> ... -> RUN`` (each run's
``config.toml`` names its own base). :func:`base_chain` resolves and checks the chain once per stage: every run
must have finished ingest and embed, with the same embed settings as the increment (otherwise its vectors are not
comparable), and no run may appear twice. Nothing here writes to a base run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from curation.io.artifacts import CLUSTERS_DIR, EMBEDDINGS_DIR, MANIFEST_DIR, SHARDS_DIR
from curation.io.fs import exists, join, read_json
from curation.io.parts import part_name

__all__ = ["BaseRun", "base_chain", "local_abspath", "run_config"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseRun:
    """One finished run of the chain (oldest first)."""

    run_dir: str
    name: str
    manifest_parts: int
    embedding_parts: int
    records: dict[str, dict[str, Any]]
    """``_SUCCESS.json`` of its finished stages, by output directory name."""

    @property
    def manifest_urls(self) -> list[str]:
        return [join(self.run_dir, MANIFEST_DIR, part_name(i)) for i in range(self.manifest_parts)]

    @property
    def embedding_urls(self) -> list[str]:
        return [join(self.run_dir, EMBEDDINGS_DIR, part_name(i)) for i in range(self.embedding_parts)]

    @property
    def has_clusters(self) -> bool:
        return CLUSTERS_DIR in self.records

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Shard entries of its ``shards/index.json`` (empty without a shard stage)."""
        index = read_json(join(self.run_dir, SHARDS_DIR, "index.json")) if SHARDS_DIR in self.records else None
        return list(index["shards"]) if index else []


def run_config(run_dir: str) -> Any:
    """The resolved :class:`curation.config.RunConfig` a run wrote to its ``config.toml``."""
    from curation.config import RunConfig
    from pretrain.utils.config import load_config

    url = join(run_dir, "config.toml")
    if not exists(url):
        raise ValueError(f"base run {run_dir} has no config.toml: it is not a curation run directory")
    return load_config(RunConfig, url)


def local_abspath(url: str) -> str:
    """``url`` without a trailing slash, made absolute when it is a local path."""
    url = url.rstrip("/")
    return url if "://" in url else os.path.abspath(url)


def _record(run_dir: str, name: str) -> dict[str, Any] | None:
    return read_json(join(run_dir, name, "_SUCCESS.json"))


def base_chain(config: Any) -> list[BaseRun]:
    """The chain of finished base runs of ``config`` (oldest first); ``[]`` for a full run.

    Raises ``ValueError`` naming the run and the reason when a base run is unfinished, embeds differently or
    repeats.
    """
    from pretrain.utils.config import to_dict

    chain: list[BaseRun] = []
    seen: set[str] = set()
    base = config.base
    while base:
        base = local_abspath(base)
        if base in seen:
            raise ValueError(f"base: the chain of base runs loops at {base}")
        seen.add(base)
        cfg = run_config(base)
        records = {n: r for n in (MANIFEST_DIR, EMBEDDINGS_DIR, "dedup", CLUSTERS_DIR, "selection", SHARDS_DIR)
                   if (r := _record(base, n)) is not None}  # fmt: skip
        for need in (MANIFEST_DIR, EMBEDDINGS_DIR):
            if need not in records:
                raise ValueError(f"base run {base} has not finished its {need}/ stage: finish it (python -m curation "
                                 f"run on it again) before adding an increment")  # fmt: skip
        if to_dict(cfg.embed) != to_dict(config.embed):
            diff = sorted(k for k, v in to_dict(config.embed).items() if to_dict(cfg.embed).get(k) != v)
            raise ValueError(f"embed settings differ from base run {base} ({', '.join('embed.' + d for d in diff)}): "
                             "an increment must embed exactly as its base, or its vectors are not comparable")
        rec_m, rec_e = records[MANIFEST_DIR], records[EMBEDDINGS_DIR]
        chain.append(BaseRun(base, cfg.name, int(rec_m["manifest_parts"]), int(rec_e["embedding_parts"]), records))
        base = cfg.base
    chain.reverse()
    return chain
