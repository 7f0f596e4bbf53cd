"""Ingest: list sources, hash and decode-check every image, collapse exact duplicates into a manifest.

Step ``scan`` (one part per work unit: a chunk of loose files or one tar shard, streamed) writes
``occurrences/part-N`` (one row per source occurrence, sorted by uid) and ``rejects/part-N``. Step ``collapse``
(tasks over uid ranges) groups the accepted occurrences by uid into ``manifest/part-N``: one row per unique
image with every URI holding those bytes. Bad files become reject rows; nothing here fails the run.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import time
from collections import Counter
from dataclasses import asdict
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schemas
from curation.config import IngestConfig, RunConfig
from curation.decode import DecodeLimits, Rejected, inspect_image
from curation.io.artifacts import BASE_COPIES_DIR, MANIFEST_DIR
from curation.io.chain import base_chain
from curation.io.fs import get_fs, join, read_json, write_json, write_parquet
from curation.io.parts import PartStore
from curation.io.sources import IngestUnit, extension, member_uri, plan_units
from curation.stages.base import Executor, Stage, merge_stats, register_stage

__all__ = [
    "IngestStage",
    "bucket_of",
    "check_bytes",
    "collapse_part",
    "scan_unit",
    "sources_for",
    "uid_range",
]

log = logging.getLogger(__name__)


def check_bytes(uri: str, container: str | None, offset: int, data: bytes, limits: DecodeLimits) -> dict[str, Any]:
    """One occurrence row: uid (sha1 of the bytes) and the decode check result."""
    row = _row(uri, container, offset, len(data))
    row["uid"] = hashlib.sha1(data).hexdigest()
    result = inspect_image(data, limits)
    if isinstance(result, Rejected):
        row.update(status="rejected", reason=result.reason, detail=result.detail)
    else:
        row.update(width=result.width, height=result.height, format=result.format, mode=result.mode)
        row["n_frames"] = result.n_frames
    return row


def _row(uri: str, container: str | None, offset: int, size: int, **kw: Any) -> dict[str, Any]:
    row = dict.fromkeys(schemas.SOURCES.names)
    row.update({"uri": uri, "container": container, "offset": offset, "size": size, "status": "ok", **kw})
    return row


def _rejected(uri: str, container: str | None, offset: int, size: int, reason: str, detail: str) -> dict[str, Any]:
    return _row(uri, container, offset, size, status="rejected", reason=reason, detail=detail)


def _check_file(uri: str, limits: DecodeLimits) -> dict[str, Any]:
    fs, path = get_fs(uri)
    try:
        size = fs.size(path)
        if size is not None and size > limits.max_file_bytes:
            return _rejected(uri, None, -1, size, "too_large_file", f"{size} bytes > {limits.max_file_bytes}")
        data = fs.cat_file(path)
    except (OSError, ValueError) as exc:
        return _rejected(uri, None, -1, -1, "unreadable", f"{type(exc).__name__}: {exc}")
    return check_bytes(uri, None, -1, data, limits)


def _scan_tar(tar: str, cfg: IngestConfig) -> tuple[list[dict[str, Any]], int]:
    from curation.io.tar_stream import iter_tar_members

    rows: list[dict[str, Any]] = []
    skipped = 0
    fs, path = get_fs(tar)
    try:
        with fs.open(path, "rb") as f:
            for m in iter_tar_members(f, tar, max_member_bytes=cfg.decode.max_file_bytes):
                uri = member_uri(tar, m.name)
                if m.rejected_reason:
                    rows.append(_rejected(uri, tar, m.offset_data, m.size, m.rejected_reason, m.detail))
                elif extension(m.name) not in cfg.extensions:
                    skipped += 1  # WebDataset side files (.json, .cls, .txt)
                else:
                    assert m.data is not None
                    rows.append(check_bytes(uri, tar, m.offset_data, m.data, cfg.decode))
    except (ValueError, OSError, EOFError) as exc:  # a broken shard costs its remaining members, never the run
        log.warning("tar shard %s unreadable after %d members: %s", tar, len(rows), exc)
        rows.append(_rejected(tar, None, -1, -1, "corrupt_tar", f"{type(exc).__name__}: {exc}"))
    return rows, skipped


def scan_unit(cfg: IngestConfig, units: list[IngestUnit], store: PartStore, config_hash: str, index: int) -> dict:
    """Scan work unit ``index``: write its occurrences and rejects parts, then its marker; return stats."""
    t0 = time.perf_counter()
    unit = units[index]
    if unit.kind == "tar":
        rows, skipped = _scan_tar(unit.uris[0], cfg)
    else:
        rows, skipped = [_check_file(u, cfg.decode) for u in unit.uris], 0
    table = pa.Table.from_pylist(rows, schema=schemas.SOURCES)
    table = table.sort_by([("uid", "ascending"), ("uri", "ascending")])
    write_parquet(store.data_url("occurrences", index), table)
    rej = table.filter(pc.equal(table["status"], "rejected"))
    write_parquet(store.data_url("rejects", index), rej.select(schemas.REJECTS.names).cast(schemas.REJECTS))
    reasons = Counter(rej["reason"].to_pylist())
    stats = {
        "part": index,
        "in": table.num_rows,
        "out": table.num_rows - rej.num_rows,
        "rejected": dict(sorted(reasons.items())),
        "skipped_non_image": skipped,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.mark_done("scan", index, stats, config_hash)
    return stats


def uid_range(bucket: int, n_buckets: int) -> tuple[str, str | None]:
    """``[lo, hi)`` uid bounds of a bucket, splitting the 32-bit uid prefix space evenly."""
    lo = format(bucket * (1 << 32) // n_buckets, "08x")
    hi = None if bucket == n_buckets - 1 else format((bucket + 1) * (1 << 32) // n_buckets, "08x")
    return lo, hi


def bucket_of(uids: list[str], n_buckets: int) -> list[int]:
    """Manifest bucket of each uid, consistent with :func:`uid_range`."""
    lows = [b * (1 << 32) // n_buckets for b in range(n_buckets)]
    return [bisect.bisect_right(lows, int(u[:8], 16)) - 1 for u in uids]


def _group(occ: pa.Table) -> list[dict[str, Any]]:
    """One manifest row per uid of ``occ`` (sorted by uid, uri): first location, every URI."""
    rows: list[dict[str, Any]] = []
    records = occ.to_pylist()
    start = 0
    for j in range(1, len(records) + 1):
        if j == len(records) or records[j]["uid"] != records[start]["uid"]:
            group = records[start:j]
            first = group[0]
            uris = sorted({r["uri"] for r in group})
            rows.append({k: first[k] for k in schemas.MANIFEST.names if k in first} | {"uris": uris})
            start = j
    return rows


def _in_base(base: list[tuple[str, list[str]]], lo: str, hi: str | None) -> dict[str, str]:
    """``{uid: base run}`` of the base images with a uid in ``[lo, hi)`` (only the overlapping manifest parts)."""
    found: dict[str, str] = {}
    for run_dir, urls in base:
        for b, url in enumerate(urls):
            b_lo, b_hi = uid_range(b, len(urls))
            if (hi is not None and b_lo >= hi) or (b_hi is not None and b_hi <= lo):
                continue
            fs, path = get_fs(url)
            with fs.open(path, "rb") as f:
                uids = pq.read_table(f, columns=["uid"], filters=[("uid", ">=", lo)] + ([("uid", "<", hi)] if hi
                                                                                        else []))["uid"]  # fmt: skip
            found.update((u, run_dir) for u in uids.to_pylist() if u not in found)
    return found


def collapse_part(store: PartStore, n_scan: int, n_buckets: int, per_task: int, config_hash: str, task: int,
                  base: list[tuple[str, list[str]]] | None = None) -> dict:  # fmt: skip
    """Group accepted occurrences of buckets ``[task * per_task, ...)`` into their ``manifest/part-<bucket>``.

    Each task reads every scan part once (pushing the uid range down to Parquet row groups), so the number of
    reads is scan parts x collapse tasks, whatever the number of manifest parts. In an increment (``base``:
    ``(run_dir, manifest part URLs)`` of every base run), images whose bytes a base run holds are not new: they
    go to ``base_copies/part-<bucket>`` (the base uid, the new URIs, the base run) instead of the manifest.
    """
    t0 = time.perf_counter()
    first, last = task * per_task, min(n_buckets, (task + 1) * per_task) - 1
    lo, hi = uid_range(first, n_buckets)[0], uid_range(last, n_buckets)[1]
    filters = [("status", "=", "ok"), ("uid", ">=", lo)] + ([("uid", "<", hi)] if hi else [])
    pieces = []
    for i in range(n_scan):
        fs, path = get_fs(store.data_url("occurrences", i))
        with fs.open(path, "rb") as f:
            pieces.append(pq.read_table(f, filters=filters, schema=schemas.SOURCES))
    occ = pa.concat_tables(pieces).sort_by([("uid", "ascending"), ("uri", "ascending")])
    rows = _group(occ)
    known = _in_base(base, lo, hi) if base else {}
    copies = [{"uid": r["uid"], "uris": r["uris"], "base_run": known[r["uid"]]} for r in rows if r["uid"] in known]
    rows = [r for r in rows if r["uid"] not in known]
    buckets = bucket_of([r["uid"] for r in rows], n_buckets)
    copy_buckets = bucket_of([r["uid"] for r in copies], n_buckets)
    for b in range(first, last + 1):
        part = [r for r, rb in zip(rows, buckets) if rb == b]
        write_parquet(store.data_url(MANIFEST_DIR, b), pa.Table.from_pylist(part, schema=schemas.MANIFEST))
        if base:
            mine = [r for r, rb in zip(copies, copy_buckets) if rb == b]
            write_parquet(store.data_url(BASE_COPIES_DIR, b), pa.Table.from_pylist(mine, schema=schemas.BASE_COPIES))
    stats = {
        "part": task,
        "in": occ.num_rows,
        "out": len(rows),
        "duplicates": occ.num_rows - len(rows) - len(copies),
        "base_copies": len(copies),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.mark_done("collapse", task, stats, config_hash)
    return stats


def sources_for(config: RunConfig, prefix: str) -> list[str]:
    """Sources ingested under ``prefix``: the pool (``""``), ``background`` or ``references/<name>``."""
    if not prefix:
        return list(config.ingest.sources)
    if prefix == "background":
        return list(config.dedupe.background)
    for ref in config.dedupe.references:
        if prefix == f"references/{ref.name}":
            return list(ref.sources)
    raise ValueError(f"no dedupe.references entry for {prefix!r}")


@register_stage
class IngestStage(Stage):
    """Sources -> ``manifest/`` (unique accepted images) + ``rejects/`` (+ ``occurrences/`` for lineage)."""

    name = "ingest"
    output = MANIFEST_DIR
    items_step = "scan"

    def __init__(self, config: RunConfig, run_dir: str, prefix: str = "") -> None:
        super().__init__(config, run_dir, prefix)
        self.sources = sources_for(config, prefix)

    def config_sections(self) -> tuple[Any, ...]:
        increment = (self.config.base,) if self.config.base and not self.prefix else ()
        return (self.config.ingest, self.sources, *increment)

    def _plan(self) -> list[IngestUnit]:
        """The work units, listed once and frozen in ``_work/ingest/plan.json`` so resumes see the same parts."""
        url = join(self.store.work, "plan.json")
        saved = read_json(url)
        if saved is not None and saved.get("config_hash") == self.config_hash:
            return [IngestUnit(u["kind"], tuple(u["uris"])) for u in saved["units"]]
        if not self.sources:
            raise ValueError("ingest.sources is empty: list directories, globs, tar shards or parquet URI lists")
        cfg = self.config.ingest
        units = plan_units(self.sources, cfg.extensions, cfg.uri_column, cfg.files_per_part)
        write_json(url, {"config_hash": self.config_hash, "units": [asdict(u) for u in units]})
        return units

    def run(self, executor: Executor) -> dict[str, Any]:
        cfg = self.config.ingest
        units = self._plan()
        scan = self.run_parts(
            executor, "scan", len(units), partial(scan_unit, cfg, units, self.store, self.config_hash)
        )
        accepted = sum(s["out"] for s in scan)
        n_buckets = max(1, math.ceil(accepted / cfg.rows_per_part))
        per_task = math.ceil(n_buckets / min(n_buckets, cfg.collapse_tasks))
        n_tasks = math.ceil(n_buckets / per_task)
        base = [(b.run_dir, b.manifest_urls) for b in base_chain(self.config)] if not self.prefix else []
        fn = partial(collapse_part, self.store, len(units), n_buckets, per_task, self.config_hash, base=base or None)
        collapse = self.run_parts(executor, "collapse", n_tasks, fn)
        stats = merge_stats(scan)
        unique = sum(s["out"] for s in collapse)
        in_base = sum(int(s.get("base_copies", 0)) for s in collapse)
        stats.update(
            out=unique,
            duplicates=accepted - unique - in_base,
            base_copies=in_base,
            skipped_non_image=sum(s.get("skipped_non_image", 0) for s in scan),
            rows={"manifest": unique, "rejects": stats["in"] - accepted, "occurrences": stats["in"]},
            manifest_parts=n_buckets,
            scan_parts=len(units),
        )
        return stats

