"""Bucketed Parquet shuffles: the data exchange between the map and reduce steps of a distributed stage.

A map task writes its rows grouped by a bucket number into ONE Parquet file with exactly one row group per
bucket (``0..n_buckets-1``, empty row groups included), so a reduce task for bucket ``b`` reads row group ``b``
of every map file and nothing else. Files are written atomically (a finished map file is complete), so a map
step resumes by its part markers like any other step. No process ever holds more than one map task's rows
(writer) or one bucket (reader): the memory of a shuffle is bounded by the bucket size, which the caller sets
through the number of buckets.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.io.fs import atomic_write_bytes, get_fs

__all__ = ["bucket_of_ranges", "read_bucket", "write_buckets"]


def write_buckets(url: str, table: pa.Table, bucket: np.ndarray, n_buckets: int,
                  compression: str = "none") -> list[int]:
    """Write ``table`` at ``url`` with row group ``b`` holding the rows whose ``bucket`` is ``b``.

    Rows keep their order inside a bucket. Returns the row count of every bucket. Written without dictionary
    encoding and, by default, uncompressed: shuffle files are read once, and vectors do not compress.
    """
    bucket = np.asarray(bucket, dtype=np.int64)
    if bucket.shape != (table.num_rows,):
        raise ValueError(f"bucket must give one bucket per row ({table.num_rows}), got shape {bucket.shape}")
    if n_buckets < 1 or (len(bucket) and (bucket.min() < 0 or bucket.max() >= n_buckets)):
        raise ValueError(f"bucket numbers must lie in [0, {n_buckets})")
    order = np.argsort(bucket, kind="stable")
    counts = np.bincount(bucket, minlength=n_buckets)
    starts = np.r_[0, np.cumsum(counts)]
    sorted_table = table.take(pa.array(order)) if len(order) else table
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression=compression, use_dictionary=False) as writer:
        for b in range(n_buckets):
            piece = sorted_table.slice(int(starts[b]), int(counts[b]))
            writer.write_table(piece, row_group_size=max(1, int(counts[b])))
    atomic_write_bytes(url, buf.getvalue())
    return counts.astype(int).tolist()


def read_bucket(urls: Sequence[str], bucket: int, schema: pa.Schema, columns: Sequence[str] | None = None
                ) -> pa.Table:  # fmt: skip
    """Rows of ``bucket`` from every map file in ``urls`` (in file order), as one table of ``schema``."""
    pieces = []
    for url in urls:
        fs, path = get_fs(url)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if pf.metadata.num_row_groups <= bucket:
                raise ValueError(f"{url} has {pf.metadata.num_row_groups} buckets, bucket {bucket} was asked for")
            if pf.metadata.row_group(bucket).num_rows:
                pieces.append(pf.read_row_group(bucket, columns=list(columns) if columns else None))
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    if not pieces:
        return schema.empty_table()
    return pa.concat_tables([p.cast(schema) for p in pieces])


def bucket_of_ranges(ids: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Bucket of each id when bucket ``b`` holds the ids in ``[starts[b], starts[b + 1])`` (``starts[0] = 0``)."""
    return np.searchsorted(np.asarray(starts, dtype=np.int64), np.asarray(ids, dtype=np.int64), side="right") - 1
