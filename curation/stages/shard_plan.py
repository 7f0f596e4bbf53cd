"""Planning steps of the shard stage: a seeded two-level shuffle of the selection, joined with its lineage,
without a global table anywhere (see :mod:`curation.stages.shard` for the order of the steps).

Uids are sha1 hex digests, uniform, so equal ranges of their first 40 bits split any set of uids evenly: the
*fine buckets* (``n_fine`` ranges, each about ``group_rows / 4`` manifest rows) are the buckets of both
shuffles (:mod:`curation.io.buckets`), and bucket order is uid order.

* ``select`` (a batch of selection parts of at most ``group_rows`` rows): the selected rows, bucketed;
* ``lineage`` (a batch of manifest parts): each manifest row with its dedup component (``dedup/part-N`` is
  aligned with ``manifest/part-N`` through ``embeddings/part-N``) and cluster ids (``clusters/assign/part-N``),
  joined inside the part, bucketed;
* ``join`` (fine bucket ``f``): the selected rows of ``f`` with their lineage, sorted by uid;
* ``plan`` (group ``g``: consecutive fine buckets of at most ``group_rows`` selected rows): the group in uid
  order, permuted under the seed (one group: ``default_rng(seed)``, as a whole-selection shuffle; else the
  group's own stream ``SeedSequence(seed, spawn_key=(g,))``), unlabelled rows dropped when asked, cut into
  shards (count and byte limits); written as the group's plan file, its shard count returned.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import RunConfig
from curation.io.buckets import read_bucket, write_buckets
from curation.io.fs import get_fs, join, read_parquet, write_parquet
from curation.io.parts import PartStore, part_name
from curation.schemas import MANIFEST, SELECTION
from curation.stages.shard_tar import label_of

__all__ = [
    "FINE_PER_GROUP",
    "MAX_FINE",
    "ShardJob",
    "assign_levels",
    "data_url",
    "fine_bucket",
    "join_part",
    "lineage_part",
    "lineage_schema",
    "parquet_rows",
    "plan_part",
    "plan_url",
    "select_part",
]

#: Fine buckets per ``group_rows`` manifest rows: groups are packed from fine buckets, so each is at most
#: ``group_rows`` samples and at least about three quarters of that.
FINE_PER_GROUP = 4
#: Most fine buckets: (40-bit uid prefix) * n_fine stays below 2**63.
MAX_FINE = 1 << 20
_LINEAGE = ("uris", "uri", "container", "offset", "size", "width", "height", "format")
_JSON_ESTIMATE = 1024


def fine_bucket(uids: Sequence[str], n_fine: int) -> np.ndarray:
    """Fine bucket of each uid: ``n_fine`` equal ranges of the first 40 bits of the hex digest (uid order)."""
    try:
        prefix = np.fromiter((int(u[:10].ljust(10, "0"), 16) for u in uids), np.int64, count=len(uids))
    except ValueError as exc:
        raise ValueError(f"shard: uids must be hex digests ({exc})") from exc
    return (prefix * n_fine) >> 40


def parquet_rows(urls: Sequence[str]) -> list[int]:
    """Row count of every Parquet file in ``urls`` (from the footers)."""
    rows = []
    for url in urls:
        fs, path = get_fs(url)
        with fs.open(path, "rb") as f:
            rows.append(pq.ParquetFile(f).metadata.num_rows)
    return rows


def assign_levels(url: str) -> int:
    """Cluster levels of an assignment part (its ``l1..lK`` columns)."""
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        names = pq.read_schema(f).names
    return sum(1 for n in names if n[:1] == "l" and n[1:].isdigit())


def data_url(store: PartStore, step: str, index: int) -> str:
    """Data file of part ``index`` of a planning step (its marker stays apart, in ``_work/shard/<step>/``)."""
    return join(store.work, "data", step, part_name(index))


def plan_url(store: PartStore, group: int) -> str:
    """The plan file of shard group ``group``: its rows with ``position``, ``label``, ``class`` and local ``shard``."""
    return data_url(store, "plan", group)


def lineage_schema(levels: int) -> pa.Schema:
    """Rows of the ``lineage`` shuffle: uid, manifest location, dedup component and (with ``levels``) clusters."""
    fields = [MANIFEST.field("uid"), *(MANIFEST.field(c) for c in _LINEAGE), pa.field("component", pa.int64())]
    if levels:
        fields.append(pa.field("clusters", pa.struct([(f"l{k}", pa.int32()) for k in range(1, levels + 1)])))
    return pa.schema(fields)


@dataclass
class ShardJob:
    """Inputs and layout of one shard plan (small: URLs, batches and counts)."""

    config: RunConfig
    store: PartStore
    config_hash: str
    source: str
    """``selection``, ``balanced`` or ``dedup`` (then ``select_urls`` are the dedup parts, rows with ``keep``)."""
    select_urls: list[str]
    select_batches: list[tuple[int, int]]
    manifest_urls: list[str]
    dedup_urls: list[str]
    assign_urls: list[str]
    """Empty without a finished cluster stage."""
    levels: int
    lineage_batches: list[tuple[int, int]]
    n_fine: int

    def work(self, step: str, index: int) -> str:
        return data_url(self.store, step, index)

    def map_files(self, step: str) -> list[str]:
        batches = self.select_batches if step == "select" else self.lineage_batches
        return [self.work(step, i) for i in range(len(batches))]


def _done(job: ShardJob, step: str, index: int, t0: float, **stats: Any) -> dict[str, Any]:
    out = {"part": index, **stats, "seconds": round(time.perf_counter() - t0, 3)}
    job.store.mark_done(step, index, out, job.config_hash)
    return out


def _selected_rows(job: ShardJob, p: int) -> tuple[pa.Table, int]:
    """Selection rows of input part ``p`` and the rows read."""
    if job.source != "dedup":
        t = read_parquet(job.select_urls[p], schema=SELECTION)
        return t, t.num_rows
    d = read_parquet(job.select_urls[p], columns=["uid", "keep"])
    uids = d["uid"].filter(d["keep"])
    n = len(uids)
    t = pa.table({"uid": uids, "reason": pa.array(["kept"] * n, pa.string()), "seed_set": pa.nulls(n, pa.string()),
                  "seed_uid": pa.nulls(n, pa.string()), "score": pa.nulls(n, pa.float32()),
                  "n_seeds": pa.nulls(n, pa.int32())}, schema=SELECTION)  # fmt: skip
    return t, d.num_rows


def select_part(job: ShardJob, index: int) -> dict[str, Any]:
    """Bucket the selected rows of selection batch ``index`` by fine bucket."""
    t0 = time.perf_counter()
    p0, p1 = job.select_batches[index]
    pieces, read = [], 0
    for p in range(p0, p1):
        t, n = _selected_rows(job, p)
        pieces.append(t)
        read += n
    table = pa.concat_tables(pieces) if pieces else SELECTION.empty_table()
    write_buckets(job.work("select", index), table, fine_bucket(table["uid"].to_pylist(), job.n_fine), job.n_fine)
    return _done(job, "select", index, t0, **{"in": read, "out": table.num_rows, "held": read})


def _lineage_rows(job: ShardJob, p: int) -> tuple[pa.Table, int]:
    """Manifest part ``p`` with the dedup component and cluster ids of each row; and its manifest rows (each
    with at most one dedup and one assignment row)."""
    m = read_parquet(job.manifest_urls[p], columns=["uid", *_LINEAGE])
    d = read_parquet(job.dedup_urls[p], columns=["uid", "component", "keep"])
    read = m.num_rows
    if job.source == "dedup":  # only kept rows can be selected
        m = m.filter(pc.is_in(m["uid"], value_set=d["uid"].filter(d["keep"]).combine_chunks()))
    uids = m["uid"].combine_chunks()
    idx = pc.index_in(uids, value_set=d["uid"].combine_chunks())
    cols = [m[c] for c in m.column_names] + [d["component"].combine_chunks().take(idx)]
    if job.levels:
        a = read_parquet(job.assign_urls[p], columns=["uid", *(f"l{k}" for k in range(1, job.levels + 1))])
        ia = pc.index_in(uids, value_set=a["uid"].combine_chunks())
        names = a.column_names[1:]
        cols.append(pa.StructArray.from_arrays([a[c].combine_chunks().take(ia) for c in names], names=names,
                                               mask=pc.is_null(ia)))  # fmt: skip
    return pa.Table.from_arrays(cols, schema=lineage_schema(job.levels)), read


def lineage_part(job: ShardJob, index: int) -> dict[str, Any]:
    """Bucket the lineage rows of manifest batch ``index`` by fine bucket."""
    t0 = time.perf_counter()
    p0, p1 = job.lineage_batches[index]
    pieces, read = [], 0
    for p in range(p0, p1):
        t, n = _lineage_rows(job, p)
        pieces.append(t)
        read += n
    table = pa.concat_tables(pieces) if pieces else lineage_schema(job.levels).empty_table()
    write_buckets(job.work("lineage", index), table, fine_bucket(table["uid"].to_pylist(), job.n_fine), job.n_fine)
    return _done(job, "lineage", index, t0, **{"in": read, "out": table.num_rows, "held": read})


def join_part(job: ShardJob, index: int) -> dict[str, Any]:
    """Selected rows of fine bucket ``index`` with their lineage, in uid order."""
    t0 = time.perf_counter()
    sel = read_bucket(job.map_files("select"), index, SELECTION)
    lin = read_bucket(job.map_files("lineage"), index, lineage_schema(job.levels))
    idx = pc.index_in(sel["uid"].combine_chunks(), value_set=lin["uid"].combine_chunks())
    if idx.null_count:
        missing = sel["uid"].filter(pc.is_null(idx))
        raise ValueError(f"{len(missing)} selected uids are not in the manifest of {job.store.run_dir} (e.g. "
                         f"{missing[0]}); the selection belongs to another run")  # fmt: skip
    joined = sel
    for name in lin.column_names[1:]:
        joined = joined.append_column(lin.schema.field(name), lin[name].combine_chunks().take(idx))
    write_parquet(job.work("joined", index), joined.sort_by("uid"))
    held = sel.num_rows + lin.num_rows
    return _done(job, "join", index, t0, **{"in": held, "out": sel.num_rows, "held": held})


def _cut(sizes: np.ndarray, per_shard: int, max_bytes: int) -> np.ndarray:
    """Shard index of every sample (in order): a new shard after ``per_shard`` samples, or before the tar
    (end-of-archive blocks and padding to 10 KiB records included) would exceed ``max_bytes``."""
    shard = np.zeros(len(sizes), np.int64)
    cur, count, nbytes = 0, 0, 0
    for i, s in enumerate(sizes.tolist()):
        padded = -(-(nbytes + s + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
        if count and (count >= per_shard or (max_bytes and padded > max_bytes)):
            cur, count, nbytes = cur + 1, 0, 0
        shard[i], count, nbytes = cur, count + 1, nbytes + s
    return shard


def _estimate(size: np.ndarray) -> np.ndarray:
    """Tar bytes of each sample: image, JSON (<= 1 KiB assumed) and cls members, each a header plus padded data."""
    return 512 + -(-size // 512) * 512 + 512 + _JSON_ESTIMATE + 512 + 512


def plan_part(job: ShardJob, groups: Sequence[tuple[int, int]], index: int) -> dict[str, Any]:
    """Shuffle group ``index`` (fine buckets ``groups[index]``), cut it into shards, write its plan file."""
    t0 = time.perf_counter()
    cfg, seed = job.config.shard, job.config.seed
    f0, f1 = groups[index]
    table = pa.concat_tables([read_parquet(job.work("joined", f)) for f in range(f0, f1)])
    n = table.num_rows
    rng = np.random.default_rng(seed if len(groups) == 1 else np.random.SeedSequence(seed, spawn_key=(index,)))
    order = rng.permutation(n) if cfg.shuffle else np.arange(n)
    table = table.take(pa.array(order, pa.int64()))
    labels = [label_of(u, cfg) for u in table["uri"].to_pylist()]
    keep = [lab is not None or cfg.unlabelled == "keep" for lab in labels]
    if not all(keep):
        table = table.filter(pa.array(keep, pa.bool_()))
        labels = [lab for lab, k in zip(labels, keep) if k]
    m = table.num_rows
    size = np.asarray(table["size"].to_numpy(zero_copy_only=False), np.int64)
    shards = _cut(_estimate(size), cfg.samples_per_shard, cfg.max_shard_bytes)
    classes = [cfg.classes[lab] if lab is not None and cfg.classes else None for lab in labels]
    for name, values in (
        ("position", pa.array(np.arange(m), pa.int64())),
        ("label", pa.array(labels, pa.int64())),
        ("class", pa.array(classes, pa.string())),
        ("shard", pa.array(shards, pa.int64())),
    ):
        table = table.append_column(name, values)
    write_parquet(job.work("plan", index), table)
    n_shards = int(shards.max()) + 1 if m else 0
    return _done(job, "plan", index, t0, **{"in": n, "out": m, "held": n, "shards": n_shards})
