"""Dedupe: copy detection over the pool embeddings and decontamination against reference sets, as part-sized
Ray tasks (DINOv2 App. A.3: k-NN graph, threshold, connected components, one image kept per component).

Steps (each a set of parts with markers, so a killed run resumes at the first unfinished part):

1. candidate pairs and the copy graph (:mod:`curation.stages.copygraph`): ``join`` tasks over tile pairs
   (exact plan, pools up to ``dedupe.index.exact_max``) or ``train`` -> ``bucket`` -> ``join`` over IVF list
   groups (larger pools); ``reduce`` per block merges them into the top-``k`` edges above the threshold and
   every image's best partner;
2. ``refs`` per block: decontamination matches against every reference set (ingested and embedded with the
   pool's model into ``references/<name>/``) and ``recall`` per block (+ ``recall-merge``): the candidate
   recall against the exact graph on a seeded sample (``dedupe.recall_sample``), reported as ``edge_recall``;
3. connected components of the copy graph, and of the decontamination graph (pool-pool edges above
   ``decontam_threshold`` plus the reference matches), by star contraction over bucketed edges
   (:mod:`curation.stages.components`);
4. ``keep`` / ``resolve`` / ``write`` (:mod:`curation.stages.dedupe_steps`): the largest image of each
   component is kept (ties: the first in part order); components touching a reference are dropped
   (``contaminated``). The step data under ``_work/dedupe/`` is deleted once every step is done (markers stay).

Outputs: ``dedup/part-N`` (aligned with ``embeddings/part-N``: uid, component = smallest member gid, keep,
nearest_uid, score, contaminated) and ``decontam/part-B`` per block (pool uid, reference set, reference
uid/uri, score; one empty part without reference sets). With ``dedupe.background`` scores are
SSCD-normalised against that set.

**Memory contract.** No process holds more than O(``block_rows``) vectors, edges or rows: a task loads one
tile pair, one IVF list group or one block (``dedupe.block_rows`` vectors, at most ``k`` edges each), plus the
small global state (IVF centroids, the reference and background sets, the recall sample). The driver holds
part counts and task statistics only. ``block_rows`` bounds every task; ``replicas``, ``list_rows`` and
``index.exact_max`` set the accuracy and cost of the candidate generation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from curation import schemas
from curation.io.artifacts import DEDUP_DIR, EMBEDDINGS_DIR, manifest_parts
from curation.io.chain import base_chain
from curation.io.fs import get_fs, join, read_json, read_parquet, write_parquet
from curation.io.parts import PartStore, part_name
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.components import ComponentGraph, run_components
from curation.stages.copygraph import (
    GraphJob,
    bucket_part,
    exact_join_part,
    exact_pairs,
    exact_tiles,
    ivf_join_part,
    plan_blocks,
    reduce_part,
    train_part,
)
from curation.stages.dedupe_steps import (
    RefSet,
    edge_recall,
    keep_part,
    recall_part,
    recall_sample,
    refs_part,
    resolve_part,
    write_part,
)
from curation.stages.embed import EmbedStage
from curation.stages.ingest import IngestStage
from curation.stages.verify_features import features_part
from curation.stages.verify_steps import locate_part, verify_part

__all__ = ["DedupeStage", "reference_prefix"]

log = logging.getLogger(__name__)

#: Components listed with their weakest link in the stage stats (``largest_components``).
LARGEST = 5


def reference_prefix(name: str) -> str:
    """Run-directory prefix of a reference set's own ingest and embed outputs."""
    return f"references/{name}"


def _embedding_parts(run_dir: str, prefix: str) -> tuple[list[str], list[int], int]:
    """``(part URLs, rows per part, dim)`` of a finished embed stage (row counts from the Parquet footers)."""
    store = PartStore(run_dir, "embed", EMBEDDINGS_DIR, prefix)
    rec = read_json(store.success_url)
    if rec is None:
        raise ValueError(f"no finished embed stage in {store.root}: run the embed stage first")
    urls = [join(store.root, EMBEDDINGS_DIR, part_name(i)) for i in range(int(rec["embedding_parts"]))]
    sizes = []
    for url in urls:
        fs, path = get_fs(url)
        with fs.open(path, "rb") as f:
            sizes.append(pq.ParquetFile(f).metadata.num_rows)
    return urls, sizes, int(rec["dim"])


@register_stage
class DedupeStage(Stage):
    """``embeddings/`` -> ``dedup/`` (uid, component, keep, nearest_uid, score, contaminated) + ``decontam/``."""

    name = "dedupe"
    output = DEDUP_DIR
    requires = ("embed",)
    items_step = "write"

    def config_sections(self) -> tuple[Any, ...]:
        embed = EmbedStage(self.config, self.run_dir, self.prefix)
        increment = (self.config.base,) if self.config.base and not self.prefix else ()
        return (embed.config_hash, self.config.dedupe, *increment)

    def _embedded(self, executor: Executor, prefix: str) -> tuple[list[str], list[int]]:
        IngestStage(self.config, self.run_dir, prefix).execute(executor)
        EmbedStage(self.config, self.run_dir, prefix).execute(executor)
        urls, sizes, _ = _embedding_parts(self.run_dir, prefix)
        return urls, sizes

    def _references(self, executor: Executor) -> tuple[list[RefSet], int]:
        refs, total = self._base_refs()
        for ref in self.config.dedupe.references:
            prefix = reference_prefix(ref.name)
            urls, sizes = self._embedded(executor, prefix)
            manifest = manifest_parts(PartStore(self.run_dir, "ingest", IngestStage.output, prefix))
            refs.append(RefSet(ref.name, urls, manifest))
            total += sum(sizes)
        return refs, total

    def _base_refs(self) -> tuple[list[RefSet], int]:
        """An increment's base runs as one pre-embedded reference set ``base`` (never re-embedded): a new image
        matching a base image as a copy would (``candidate_threshold`` and ``max_candidates`` with verification,
        else ``threshold`` and ``k``) is dropped with its whole component; base images are never dropped."""
        if not self.config.base or self.prefix:
            return [], 0
        cfg = self.config.dedupe
        chain = base_chain(self.config)
        ref = RefSet("base", [u for b in chain for u in b.embedding_urls], [u for b in chain for u in b.manifest_urls],
                     threshold=cfg.candidate_threshold if cfg.verify else cfg.threshold,
                     k=cfg.max_candidates if cfg.verify else cfg.k)  # fmt: skip
        return [ref], sum(int(b.records[EMBEDDINGS_DIR]["out"]) for b in chain)

    def run(self, executor: Executor) -> dict[str, Any]:
        from curation.index.config import plan_index

        cfg = self.config.dedupe
        refs, n_refs = self._references(executor)
        background = self._embedded(executor, "background")[0] if cfg.background else []
        urls, sizes, dim = _embedding_parts(self.run_dir, self.prefix)
        n = sum(sizes)
        decontam = bool(refs) and n_refs > 0
        edge_t = cfg.candidate_threshold if cfg.verify else cfg.threshold
        job = GraphJob(
            cfg=cfg, store=self.store, config_hash=self.config_hash, part_urls=urls,
            part_starts=np.r_[0, np.cumsum(sizes)].astype(int).tolist(), dim=dim,
            blocks=plan_blocks(sizes, cfg.block_rows),
            threshold=min(edge_t, cfg.decontam_threshold) if decontam else edge_t,
            background=background, ref_count=n_refs if decontam else 0, verify=cfg.verify,
        )  # fmt: skip
        n_blocks = len(job.blocks)
        plan = plan_index(n, dim, cfg.index).kind if n else "flat"
        log.info("dedupe: %d embeddings in %d parts, %d blocks, %s plan (k=%d, threshold=%.3f)",
                 n, len(urls), n_blocks, "exact" if plan == "flat" else "IVF", cfg.k, cfg.threshold)  # fmt: skip
        stats: dict[str, Any] = {"plan": "exact" if plan == "flat" else "ivf", "blocks": n_blocks}
        if plan == "flat":
            tiles = exact_tiles(job)
            n_join = len(exact_pairs(len(tiles)))
            self.run_parts(executor, "join", n_join, partial(exact_join_part, job, tiles))
        else:
            train = self.run_parts(executor, "train", 1, partial(train_part, job))[0]
            n_join = int(train["groups"])
            self.run_parts(executor, "bucket", len(urls), partial(bucket_part, job, n_join))
            joins = self.run_parts(executor, "join", n_join, partial(ivf_join_part, job))
            stats.update(nlist=train["nlist"], largest_list=max(int(p["largest_list"]) for p in joins))
        stats["join_tasks"] = n_join
        reduced = self.run_parts(executor, "reduce", n_blocks, partial(reduce_part, job, n_join, decontam))
        manifest = manifest_parts(PartStore(self.run_dir, "ingest", IngestStage.output, self.prefix))
        cc_inputs = None
        if cfg.verify:
            n_cand = sum(int(p["candidates"]) for p in reduced)
            job = replace(job, verify_split=max(1, -(-n_cand // (cfg.verify_task_pairs * n_blocks))))
            t_verify = time.perf_counter()
            self.run_parts(executor, "locate", n_blocks, partial(locate_part, job, manifest))
            extracted = self.run_parts(executor, "features", job.verify_tasks,
                                       partial(features_part, job, self.config, manifest))  # fmt: skip
            checked = self.run_parts(executor, "verify", job.verify_tasks,
                                     partial(verify_part, job, self.config, manifest, decontam))  # fmt: skip
            cc_inputs = [job.work("cc-dup", "r0", part_name(t)) for t in range(job.verify_tasks)]
            stats.update(candidates=n_cand, verify_parts=job.verify_tasks,
                         checked_pairs=sum(int(p.get("checked", p["in"])) for p in checked),
                         connected_pairs=sum(int(p.get("connected", 0)) for p in checked),
                         verified=sum(int(p["out"]) for p in checked),
                         verified_images=sum(int(p["in"]) for p in extracted),
                         features_seconds=round(sum(float(p["seconds"]) for p in extracted), 3),
                         verify_unreadable_pairs=sum(int(p["unreadable_pairs"]) for p in checked),
                         verify_seconds=round(sum(float(p["seconds"]) for p in checked), 3),
                         verify_wall_seconds=round(time.perf_counter() - t_verify, 3))  # fmt: skip
        if decontam:
            self.run_parts(executor, "refs", n_blocks, partial(refs_part, job, refs, self.config, manifest))
        if cfg.recall_sample and n:
            sample = recall_sample(job)
            self.run_parts(executor, "recall", n_blocks, partial(recall_part, job, sample))
            merged = self.run_parts(executor, "recall-merge", 1, partial(edge_recall, job, len(sample[0])))[0]
            stats.update({k: merged[k] for k in ("edge_recall", "recall_exact_edges")}, recall_sample=merged["in"])
        starts = job.block_starts[:-1].tolist()
        dup = ComponentGraph("cc-dup", job.work("cc-dup"), starts, self.store, self.config_hash)
        stats["cc_rounds"] = run_components(self, executor, dup, cc_inputs or dup.round_files(0))["rounds"]
        dec = None
        if decontam:
            dec_starts = [0] + [s + n_refs for s in starts[1:]]
            dec = ComponentGraph("cc-dec", job.work("cc-dec"), dec_starts, self.store, self.config_hash)
            ref_files = [job.work("cc-dec", "refs", part_name(b)) for b in range(n_blocks)]
            dec_inputs = [job.work("cc-dec", "r0", part_name(t)) for t in range(job.verify_tasks)] if cfg.verify \
                else dec.round_files(0)
            run_components(self, executor, dec, dec_inputs + ref_files)
        self.run_parts(executor, "keep", n_blocks, partial(keep_part, job, manifest, dup, dec))
        self.run_parts(executor, "resolve", n_blocks, partial(resolve_part, job))
        written = self.run_parts(executor, "write", n_blocks, partial(write_part, job))
        if not decontam:  # no reference set: one empty match table, so readers always find decontam/
            write_parquet(self.store.data_url("decontam", 0), schemas.DECONTAM.empty_table())
        matches = self._decontam_rows(n_blocks) if decontam else 0
        if self.config.base and not self.prefix:
            stats["base_matched"] = self._base_matched(n_blocks) if decontam else 0
        total = {k: sum(int(p[k]) for p in written) for k in ("in", "out", "duplicates", "contaminated",
                                                              "components")}  # fmt: skip
        stats.update({
            "in": total["in"], "out": total["out"],
            "rejected": {"duplicate": total["duplicates"], "contaminated": total["contaminated"]},
            "components": total["components"], "decontam_matches": matches,
            "rows": {"dedup": total["in"], "decontam": matches}, "dedup_parts": len(urls),
            "decontam_parts": n_blocks if decontam else 1,
        })  # fmt: skip
        self._drop_intermediates()
        stats["largest_components"] = self._largest(executor, len(urls))
        if stats["largest_components"]:
            top = stats["largest_components"][0]
            log.info("dedupe: largest component %d images, its weakest link %s (score %s)", top["size"],
                     top["weakest_uid"], top["weakest_score"])  # fmt: skip
        return stats

    def _largest(self, executor: Executor, n_parts: int) -> list[dict[str, Any]]:
        """The ``LARGEST`` biggest components with their most loosely attached member (a bad threshold shows as a
        large component held together by a low score)."""
        from curation.stages.report_data import largest_components, weakest_links

        _, top = largest_components(executor, self.run_dir, join(self.store.work, "largest"), n_parts, LARGEST)
        weak = weakest_links(executor, self.run_dir, n_parts, [c for c, _ in top])
        return [{"component": c, "size": size, "weakest_uid": weak[c]["uid"],
                 "weakest_partner": weak[c]["nearest_uid"],
                 "weakest_score": None if weak[c]["score"] is None else round(float(weak[c]["score"]), 4)}
                for c, size in top]  # fmt: skip

    def _drop_intermediates(self) -> None:
        """Delete the step data under ``_work/dedupe`` (vector buckets, edges, labels); the markers stay, so a
        rerun still skips every step. Every statistic the driver reports comes from markers or outputs."""
        fs, path = get_fs(self.store.work)
        if fs.exists(path):
            for f in fs.find(path):
                if not f.endswith(".json"):
                    fs.rm(f)

    def _base_matched(self, n_blocks: int) -> int:
        """New images matching a base image (dropped, with their components, as copies of the base)."""
        total = 0
        for b in range(n_blocks):
            t = read_parquet(self.store.data_url("decontam", b), columns=["uid", "reference"])
            total += len({u for u, r in zip(t["uid"].to_pylist(), t["reference"].to_pylist()) if r == "base"})
        return total

    def _decontam_rows(self, n_blocks: int) -> int:
        total = 0
        for b in range(n_blocks):
            fs, path = get_fs(self.store.data_url("decontam", b))
            with fs.open(path, "rb") as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total
