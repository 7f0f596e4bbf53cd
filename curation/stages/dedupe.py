"""Dedupe: copy detection over the pool embeddings and decontamination against reference sets.

Copy detection (DINOv2 App. A.3) and the keep policy live in :mod:`curation.index`; this stage feeds it the
embeddings (and image areas as keep priority: the largest copy is kept), then for every reference set in
``dedupe.references`` ingests and embeds the reference images with the same model into
``references/<name>/``, matches the pool against them with the stricter ``decontam_threshold`` and drops every
copy-detection component that holds a matching pool image. With ``dedupe.background`` the copy-detection
scores are SSCD-normalised against that set (ingested and embedded into ``background/``). Outputs
``dedup/part-N`` (aligned with ``embeddings/part-N``) and ``decontam/part-00000`` (pool uid, reference set,
reference uid/uri, score). The whole pool is one computation, so an interrupted dedupe is recomputed (its
inputs are resumable parts).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from curation import schemas
from curation.config import ReferenceSet
from curation.io.artifacts import DEDUP_DIR, load_embeddings, manifest_areas, manifest_uris
from curation.io.fs import join, write_parquet
from curation.io.parts import part_name
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.embed import EmbedStage
from curation.stages.ingest import IngestStage

__all__ = ["DedupeStage", "reference_prefix"]

log = logging.getLogger(__name__)


def reference_prefix(name: str) -> str:
    """Run-directory prefix of a reference set's own ingest and embed outputs."""
    return f"references/{name}"


@register_stage
class DedupeStage(Stage):
    """``embeddings/`` -> ``dedup/`` (uid, component, keep, nearest_uid, score, contaminated) + ``decontam/``."""

    name = "dedupe"
    output = DEDUP_DIR
    requires = ("embed",)

    def config_sections(self) -> tuple[Any, ...]:
        embed = EmbedStage(self.config, self.run_dir, self.prefix)
        return (embed.config_hash, self.config.dedupe)

    def _references(self, executor: Executor) -> list[tuple[ReferenceSet, list[str], np.ndarray]]:
        out = []
        for ref in self.config.dedupe.references:
            prefix = reference_prefix(ref.name)
            IngestStage(self.config, self.run_dir, prefix).execute(executor)
            EmbedStage(self.config, self.run_dir, prefix).execute(executor)
            uids, mat, _ = load_embeddings(self.run_dir, prefix)
            out.append((ref, uids, mat))
        return out

    def run(self, executor: Executor) -> dict[str, Any]:
        from curation.index.dedup import copy_detect, decontaminate

        cfg = self.config.dedupe
        refs = self._references(executor)
        background = None
        if cfg.background:
            IngestStage(self.config, self.run_dir, "background").execute(executor)
            EmbedStage(self.config, self.run_dir, "background").execute(executor)
            background = load_embeddings(self.run_dir, "background")[1]
        uids, emb, sizes = load_embeddings(self.run_dir, self.prefix)
        n = len(uids)
        self._parts_total = self._parts_computed = len(sizes)
        self._items_computed = n
        log.info("dedupe: copy detection over %d embeddings (k=%d, threshold=%.3f)", n, cfg.k, cfg.threshold)
        if n:
            priority = manifest_areas(self.run_dir, uids)
            res = copy_detect(emb, k=cfg.k, threshold=cfg.threshold, index=cfg.index, priority=priority,
                              background=background, beta=cfg.beta, background_k=cfg.background_k, progress=True)
            component, keep = np.asarray(res.component, np.int64), np.asarray(res.keep, bool)
            nearest, score = np.asarray(res.nearest, np.int64), np.asarray(res.score, np.float32)
        else:
            component, keep = np.zeros(0, np.int64), np.zeros(0, bool)
            nearest, score = np.zeros(0, np.int64), np.zeros(0, np.float32)
        contaminated = np.zeros(n, bool)
        report: list[dict[str, Any]] = []
        for ref, ref_uids, ref_emb in refs:
            if not n or not len(ref_uids):
                continue
            dec = decontaminate(emb, ref_emb, k=min(cfg.k, len(ref_uids)), threshold=cfg.decontam_threshold,
                                index=cfg.index, progress=True)  # fmt: skip
            hit_components = np.unique(component[np.asarray(dec.drop, bool)])
            contaminated |= np.isin(component, hit_components)
            ref_uri = manifest_uris(self.run_dir, reference_prefix(ref.name))
            for p, r, s in zip(np.asarray(dec.pool_idx), np.asarray(dec.ref_idx), np.asarray(dec.score)):
                ru = ref_uids[int(r)]
                report.append(
                    {"uid": uids[int(p)], "reference": ref.name, "ref_uid": ru, "ref_uri": ref_uri.get(ru),
                     "score": float(s)}
                )  # fmt: skip
            log.info("decontamination vs %s: %d matching pairs, %d components dropped",
                     ref.name, len(dec.score), len(hit_components))  # fmt: skip
        final_keep = keep & ~contaminated
        nearest_uid = [uids[int(j)] if j >= 0 else None for j in nearest]
        start = 0
        for i, size in enumerate(sizes):
            sl = slice(start, start + size)
            table = pa.table(
                {
                    "uid": pa.array(uids[sl], pa.string()),
                    "component": pa.array(component[sl], pa.int64()),
                    "keep": pa.array(final_keep[sl], pa.bool_()),
                    "nearest_uid": pa.array(nearest_uid[sl], pa.string()),
                    "score": pa.array(score[sl], pa.float32()),
                    "contaminated": pa.array(contaminated[sl], pa.bool_()),
                },
                schema=schemas.DEDUP,
            )
            write_parquet(join(self.store.root, DEDUP_DIR, part_name(i)), table)
            start += size
        report_table = pa.Table.from_pylist(
            sorted(report, key=lambda r: (r["reference"], r["uid"], r["ref_uid"])), schema=schemas.DECONTAM
        )
        write_parquet(join(self.store.root, "decontam", part_name(0)), report_table)
        return {
            "in": n,
            "out": int(final_keep.sum()),
            "rejected": {"duplicate": int((~keep & ~contaminated).sum()), "contaminated": int(contaminated.sum())},
            "components": int(len(np.unique(component))),
            "decontam_matches": len(report),
            "rows": {"dedup": n, "decontam": len(report)},
            "dedup_parts": len(sizes),
        }
