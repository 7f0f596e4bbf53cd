"""Embed: one embeddings part per manifest part, computed by long-lived workers that load the model once.

Each worker reads its manifest part, re-reads the image bytes from their source (file or tar member by offset),
decodes and preprocesses them (in ``cpus_per_actor`` single-threaded processes when more than one CPU is
reserved, so decoding overlaps the model), embeds in batches and writes ``embeddings/part-N`` (uid, emb) in
manifest order. Images that can no longer be read are counted as rejected and left out.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor as PoolExecutor
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from curation import schemas
from curation.config import RunConfig
from curation.decode import DecodeError, DecodeLimits, load_rgb
from curation.io.artifacts import EMBEDDINGS_DIR, manifest_parts
from curation.io.fs import read_parquet, write_parquet
from curation.io.parts import PartStore
from curation.io.sources import read_location
from curation.stages.base import Executor, Stage, merge_stats, register_stage
from curation.stages.ingest import IngestStage

__all__ = ["EmbedStage", "EmbedWorker"]

log = logging.getLogger(__name__)

_LOCATION = ["uid", "uri", "container", "offset", "size"]


def _prepare(args: tuple[Any, DecodeLimits, str, str | None, int, int]) -> tuple[str, np.ndarray | None, str]:
    """Read, decode and preprocess one image; ``(uid, array or None, reject reason)``."""
    preprocess, limits, uri, container, offset, size = args
    try:
        data = read_location(uri, container, offset, size)
        img = load_rgb(data, limits, draft_size=getattr(preprocess, "draft_size", None))
        return uri, preprocess(img), ""
    except DecodeError as exc:
        return uri, None, exc.reason
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", uri, exc)
        return uri, None, "unreadable"


class EmbedWorker:
    """Embeds whole parts; built once per actor (model loaded once)."""

    def __init__(self, config: RunConfig, store: PartStore, manifest: list[str], config_hash: str) -> None:
        from curation.models import build_embedder

        self.cfg = config.embed
        self.limits = config.ingest.decode
        self.store = store
        self.manifest = manifest
        self.config_hash = config_hash
        self.embedder = build_embedder(self.cfg)
        self.pool: PoolExecutor | None = None
        if self.cfg.cpus_per_actor > 1:
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(self.cfg.cpus_per_actor, mp_context=mp.get_context("spawn"))

    def _prepared(self, rows: list[dict[str, Any]]) -> Iterator[tuple[str, np.ndarray | None, str]]:
        args = [(self.embedder.preprocess, self.limits, r["uri"], r["container"], r["offset"], r["size"]) for r in rows]
        if self.pool is None:
            yield from map(_prepare, args)
        else:
            yield from self.pool.map(_prepare, args, chunksize=8)

    def __call__(self, index: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        table = read_parquet(self.manifest[index], columns=_LOCATION)
        rows = table.to_pylist()
        uids: list[str] = []
        embs: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        batch_uids: list[str] = []
        rejected: Counter[str] = Counter()

        def flush() -> None:
            if batch:
                embs.append(self.embedder.embed(np.stack(batch)))
                uids.extend(batch_uids)
                batch.clear()
                batch_uids.clear()

        for row, (_, arr, reason) in zip(rows, self._prepared(rows)):
            if arr is None:
                rejected[reason] += 1
                continue
            batch.append(arr)
            batch_uids.append(row["uid"])
            if len(batch) == self.cfg.batch_size:
                flush()
        flush()
        dim = self.embedder.dim
        mat = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
        mat = mat.astype(self.cfg.dtype)
        values = pa.array(mat.reshape(-1), type=pa.float16() if self.cfg.dtype == "float16" else pa.float32())
        out = pa.Table.from_arrays(
            [pa.array(uids, pa.string()), pa.FixedSizeListArray.from_arrays(values, dim)],
            schema=schemas.embeddings(dim, self.cfg.dtype),
        )
        write_parquet(self.store.data_url(EMBEDDINGS_DIR, index), out)
        seconds = time.perf_counter() - t0
        stats = {
            "part": index,
            "in": len(rows),
            "out": out.num_rows,
            "rejected": dict(rejected),
            "dim": dim,
            "seconds": round(seconds, 3),
        }
        self.store.mark_done("embed", index, stats, self.config_hash)
        return stats


@register_stage
class EmbedStage(Stage):
    """``manifest/`` -> ``embeddings/`` (uid, L2-normalised fixed-size vector)."""

    name = "embed"
    output = EMBEDDINGS_DIR
    requires = ("ingest",)
    items_step = "embed"

    def config_sections(self) -> tuple[Any, ...]:
        ingest = IngestStage(self.config, self.run_dir, self.prefix)
        return (ingest.config_hash, self.config.embed)

    def pool(self, executor: Executor) -> tuple[int, float, float]:
        """``(actors, CPUs per actor, GPUs per actor)``: one actor per GPU when the cluster has GPUs or
        ``embed.device = "cuda"`` (an autoscaler then adds GPU nodes for them), CPU actors otherwise."""
        cfg = self.config.embed
        gpus = executor.num_gpus if cfg.device == "auto" else 0
        if cfg.model != "descriptor" and (gpus or cfg.device == "cuda"):
            return cfg.num_actors or max(1, gpus), cfg.cpus_per_actor, 1.0
        return cfg.num_actors or max(1, executor.num_cpus // cfg.cpus_per_actor), cfg.cpus_per_actor, 0.0

    def run(self, executor: Executor) -> dict[str, Any]:
        ingest_store = PartStore(self.run_dir, "ingest", IngestStage.output, self.prefix)
        manifest = manifest_parts(ingest_store)
        concurrency, cpus, gpus = self.pool(executor)
        config, store, h = self.config, self.store, self.config_hash
        parts = self.run_parts(
            executor,
            "embed",
            len(manifest),
            factory=lambda: EmbedWorker(config, store, manifest, h),
            concurrency=min(concurrency, max(1, len(manifest))),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        stats = merge_stats(parts)
        dims = {p["dim"] for p in parts}
        stats.update(rows={"embeddings": stats["out"]}, dim=max(dims) if dims else 0, embedding_parts=len(manifest))
        stats["actors"] = concurrency
        stats["gpus_per_actor"] = gpus
        return stats
