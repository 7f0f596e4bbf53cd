"""Shard: WebDataset tars of the selected images, with per-sample lineage, deterministic and resumable.

The selected uids (``shard.selection``: the retrieve stage's ``selection/``, the cluster stage's balanced sample
``clusters/balanced/part-*``, or every image dedupe kept) are joined with their manifest row, copy-detection
component and cluster ids, shuffled under the run seed and cut into shards of ``samples_per_shard`` (and at most
``max_shard_bytes``) by part-sized tasks (:mod:`curation.stages.shard_plan`): ``select`` and ``lineage`` bucket
the selection and the manifest by uid range, ``join`` joins each bucket, ``plan`` shuffles each *group* (uid
ranges of at most ``shard.group_rows`` selected samples) and cuts it into shards. Shards are numbered group by
group; with one group the order is ``default_rng(seed).permutation`` of the uid-sorted selection (uids are
content hashes, so a uid range is a uniform sample of the selection). ``shuffle = false`` keeps uid order. The
frozen plan (``_work/shard/plan-<hash>.json``: groups and their shard counts, plus a plan file per group) is
reused by a rerun. One task per shard then reads each image from its source (file or tar member by offset),
writes the members

* ``<uid>.jpg`` - the original bytes, or re-encoded JPEG (``shard.reencode``, ``shard.max_side``); with
  ``reencode = "never"`` PNG and WebP sources keep their bytes and extension (``<uid>.png``, ``<uid>.webp``), other
  formats (BMP, TIFF, GIF) are re-encoded to JPEG: image members only ever have an extension of the WebDataset
  sample contract (:mod:`pretrain.utils.wds_sample`), the ones the pretraining and eval readers accept;
* ``<uid>.json`` - lineage: source URI (and every URI with these bytes), container/offset, source format and
  size, stored size, dedup component, clusters ``l1..lK``, selection reason, seed set, seed uid and score, label;
* ``<uid>.cls`` - the integer label, when ``shard.label_from`` finds one,

to ``shards/{prefix}-{NNNNNN}.tar`` atomically (temporary name, then rename) with deterministic headers (USTAR,
mtime 0, uid/gid 0, mode 0644, members of a sample contiguous and in name order), then its marker. A rerun skips
finished parts of every step; the same inputs and seed give byte-identical shards. ``shards/index.json`` lists
every shard's name, sample count, bytes and sha256.

**Memory contract.** No process holds more than O(``shard.group_rows``) rows: a ``select``/``lineage`` task
holds a batch of consecutive input parts of at most ``group_rows`` rows (one larger part alone), a ``join`` task
one fine bucket (about ``group_rows / 4`` manifest rows and the selected ones among them), a ``plan`` task one
group (at most ``group_rows`` samples), a shard task one shard (``samples_per_shard`` samples). The driver holds
part counts, per-bucket sample counts and task statistics only.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from typing import Any

import numpy as np

from curation.io.artifacts import CLUSTERS_DIR, DEDUP_DIR, MANIFEST_DIR, SELECTION_DIR, SHARDS_DIR, manifest_parts
from curation.io.fs import exists, get_fs, join, read_json, write_json
from curation.io.parts import PartStore, part_name
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.copygraph import plan_blocks
from curation.stages.dedupe import DedupeStage
from curation.stages.shard_plan import (
    FINE_PER_GROUP,
    MAX_FINE,
    ShardJob,
    assign_levels,
    join_part,
    lineage_part,
    parquet_rows,
    plan_part,
    plan_url,
    select_part,
)
from curation.stages.shard_tar import encode_image, label_of, shard_name, shard_part, write_tar

__all__ = ["ShardStage", "encode_image", "label_of", "shard_name", "write_tar"]

log = logging.getLogger(__name__)


@register_stage
class ShardStage(Stage):
    """Selection + manifest + lineage -> ``shards/{prefix}-NNNNNN.tar`` and ``shards/index.json``."""

    name = "shard"
    output = SHARDS_DIR
    requires = ("dedupe",)
    items_step = "shard"

    def _source(self) -> str:
        """Which selection to shard: ``selection``, ``balanced`` or ``dedup`` (see ``shard.selection``)."""
        mode = self.config.shard.selection
        have = {
            "selection": read_json(join(self.run_dir, SELECTION_DIR, "_SUCCESS.json")) is not None,
            "balanced": exists(join(self.run_dir, CLUSTERS_DIR, "balanced", part_name(0)))
            and read_json(join(self.run_dir, CLUSTERS_DIR, "_SUCCESS.json")) is not None,
            "dedup": True,
        }
        if mode == "auto":
            return next(k for k in ("selection", "balanced", "dedup") if have[k])
        if not have[mode]:
            raise ValueError(f"shard.selection={mode!r} but {self.run_dir} has no finished {mode} output; run that "
                             "stage first or set shard.selection='auto'")  # fmt: skip
        return mode

    def config_sections(self) -> tuple[Any, ...]:
        dedupe = DedupeStage(self.config, self.run_dir, self.prefix).config_hash
        source = self._source()
        upstream: Any = None
        if source == "selection":
            upstream = (read_json(join(self.run_dir, SELECTION_DIR, "_SUCCESS.json")) or {}).get("config_hash")
        elif source == "balanced":
            upstream = (read_json(join(self.run_dir, CLUSTERS_DIR, "_SUCCESS.json")) or {}).get("config_hash")
        return (dedupe, source, upstream, self.config.shard, self.config.ingest.decode, self.config.seed)

    def _selection_urls(self, source: str, n_dedup: int) -> list[str]:
        """The selection's input parts: ``selection/``, ``clusters/balanced/`` (as many parts as the cluster
        record names, else part 0) or ``dedup/`` (rows with ``keep``)."""
        if source == "selection":
            rec = read_json(join(self.run_dir, SELECTION_DIR, "_SUCCESS.json")) or {}
            return [join(self.run_dir, SELECTION_DIR, part_name(i)) for i in range(int(rec.get("selection_parts", 1)))]
        if source == "balanced":
            rec = read_json(join(self.run_dir, CLUSTERS_DIR, "_SUCCESS.json")) or {}
            n = int(rec.get("balanced_parts", 1))
            return [join(self.run_dir, CLUSTERS_DIR, "balanced", part_name(i)) for i in range(n)]
        return [join(self.run_dir, DEDUP_DIR, part_name(i)) for i in range(n_dedup)]

    def _job(self) -> ShardJob:
        cfg = self.config.shard
        source = self._source()
        manifest = manifest_parts(PartStore(self.run_dir, "ingest", MANIFEST_DIR))
        n_dedup = int(read_json(join(self.run_dir, DEDUP_DIR, "_SUCCESS.json"))["dedup_parts"])
        if n_dedup != len(manifest):
            raise ValueError(f"{self.run_dir}: {n_dedup} dedup parts for {len(manifest)} manifest parts; rerun dedupe")
        dedup = [join(self.run_dir, DEDUP_DIR, part_name(i)) for i in range(n_dedup)]
        assign: list[str] = []
        levels = 0
        cluster = read_json(join(self.run_dir, CLUSTERS_DIR, "_SUCCESS.json"))
        if cluster is not None:
            n_assign = int(cluster["assign_parts"])
            assign = [join(self.run_dir, CLUSTERS_DIR, "assign", part_name(i)) for i in range(n_assign)]
            if len(assign) != n_dedup:
                raise ValueError(f"{self.run_dir}: {len(assign)} cluster assign parts for {n_dedup} dedup parts; "
                                 "rerun the cluster stage")  # fmt: skip
            levels = assign_levels(assign[0])
        select = self._selection_urls(source, n_dedup)
        manifest_rows = parquet_rows(manifest)
        n_fine = min(MAX_FINE, max(1, -(-FINE_PER_GROUP * sum(manifest_rows) // cfg.group_rows)))
        return ShardJob(config=self.config, store=self.store, config_hash=self.config_hash, source=source,
                        select_urls=select, select_batches=plan_blocks(parquet_rows(select), cfg.group_rows),
                        manifest_urls=manifest, dedup_urls=dedup, assign_urls=assign, levels=levels,
                        lineage_batches=plan_blocks(manifest_rows, cfg.group_rows), n_fine=n_fine)  # fmt: skip

    def _plan(self, executor: Executor) -> dict[str, Any]:
        """Run (or reuse) the planning steps; the frozen plan record (groups, shards per group, counts)."""
        url = join(self.store.work, f"plan-{self.config_hash}.json")
        rec = read_json(url)
        if rec is not None:
            return rec
        job = self._job()
        self.run_parts(executor, "select", len(job.select_batches), partial(select_part, job))
        self.run_parts(executor, "lineage", len(job.lineage_batches), partial(lineage_part, job))
        joins = self.run_parts(executor, "join", job.n_fine, partial(join_part, job))
        groups = plan_blocks([int(j["out"]) for j in joins], self.config.shard.group_rows)
        plans = self.run_parts(executor, "plan", len(groups), partial(plan_part, job, groups))
        rec = {"config_hash": self.config_hash, "source": job.source, "fine_buckets": job.n_fine,
               "groups": [list(g) for g in groups], "shards": [int(p["shards"]) for p in plans],
               "selected": sum(int(p["in"]) for p in plans), "planned": sum(int(p["out"]) for p in plans)}  # fmt: skip
        write_json(url, rec)
        self._drop_intermediates()
        return rec

    def _drop_intermediates(self) -> None:
        """Delete the shuffle data of the planning steps once the plan is frozen (group plans and markers stay)."""
        for step in ("select", "lineage", "joined"):
            fs, path = get_fs(join(self.store.work, "data", step))
            if fs.exists(path):
                fs.rm(path, recursive=True)

    def _base_shards(self) -> list[dict[str, Any]]:
        """An increment's base shards (name, count, bytes, sha256, run holding the file), oldest first: the newest
        base run with shards lists its own bases' too. The prefixes must agree so the numbering continues."""
        if not self.config.base:
            return []
        from curation.io.chain import base_chain

        with_shards = [b for b in base_chain(self.config) if b.shards]
        if not with_shards:
            return []
        last = with_shards[-1]
        prefix = read_json(join(last.run_dir, SHARDS_DIR, "index.json"))["prefix"]
        if prefix != self.config.shard.prefix:
            raise ValueError(f"shard.prefix={self.config.shard.prefix!r} but base run {last.run_dir} wrote "
                             f"{prefix!r} shards: an increment continues its base's numbering under the same prefix")
        return [{**s, "run": s.get("run", last.run_dir)} for s in last.shards]

    def run(self, executor: Executor) -> dict[str, Any]:
        cfg = self.config.shard
        plan = self._plan(executor)
        source, selected = plan["source"], int(plan["selected"])
        offsets = np.r_[0, np.cumsum(plan["shards"], dtype=np.int64)].tolist()
        n_shards = int(offsets[-1])
        if selected and not n_shards:  # every sample was dropped for want of a label
            raise ValueError(
                f"shard: none of the {selected} selected images has a label from shard.label_from="
                f"{cfg.label_from!r} (the name of the directory holding each image must be listed in shard.classes, "
                "or be an integer when shard.classes is empty), and shard.unlabelled='drop' leaves nothing to write. "
                "Put the images in class folders, set shard.classes, or set shard.unlabelled='keep' (or "
                "shard.label_from='none') to write unlabelled samples"
            )
        plans = [plan_url(self.store, g) for g in range(len(plan["groups"]))]
        log.info("shard: %d shards of <= %d samples from %s (%d groups)", n_shards, cfg.samples_per_shard, source,
                 len(plan["groups"]))  # fmt: skip
        base = self._base_shards()
        first = len(base)
        parts = self.run_parts(executor, "shard", n_shards, partial(shard_part, self.config, self.store,
                                                                    self.config_hash, plans, offsets, first=first))
        shards = [{k: p[k] for k in ("name", "count", "bytes", "sha256")} for p in parts]
        total = sum(s["count"] for s in shards)
        rejected: Counter[str] = Counter()
        for p in parts:
            rejected.update(p.get("rejected", {}))
        planned = sum(p["in"] for p in parts)
        if selected > planned:
            rejected["unlabelled"] = selected - planned
        n_all = first + n_shards
        pattern = f"{cfg.prefix}-{{{0:06d}..{n_all - 1:06d}}}.tar" if n_all else None
        labelled = sum(p["labelled"] for p in parts)
        if cfg.label_from != "none" and total and not labelled:
            log.warning("shard: shard.label_from=%r found no label for any of the %d samples (written without "
                        ".cls); set shard.classes to the class folder names", cfg.label_from, total)  # fmt: skip
        listed = base + [{**s, "run": self.run_dir} for s in shards] if self.config.base else shards
        index = {"prefix": cfg.prefix, "pattern": pattern, "shards": listed,
                 "count": sum(int(s["count"]) for s in listed), "bytes": sum(int(s["bytes"]) for s in listed),
                 "selection": source, "seed": self.config.seed, "shuffle": cfg.shuffle, "labelled": labelled,
                 "config_hash": self.config_hash}  # fmt: skip
        if self.config.base:
            index.update(base=self.config.base, new_shards=n_shards, new_count=total)
        write_json(join(self.store.output, "index.json"), index)
        return {"in": selected, "out": total, "rejected": dict(sorted(rejected.items())),
                "shards": n_shards, "pattern": pattern, "selection": source, "bytes": index["bytes"],
                "labelled": index["labelled"], "groups": len(plan["groups"]), "rows": {"samples": total}}  # fmt: skip
