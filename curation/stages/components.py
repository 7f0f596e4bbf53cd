"""Connected components over bucketed edge files, one task per bucket per round (no process sees all edges).

Input: files written with :func:`curation.io.buckets.write_buckets` holding directed rows ``(u, v)`` (both
directions of each undirected edge) in the bucket of ``u``. Round ``r`` reads bucket ``k`` of every file of
round ``r``, applies large-star (even rounds) or small-star (odd rounds) of :mod:`curation.index.stars`, and
writes its edges bucketed for round ``r + 1``. Every round is a step with part markers, so a killed run resumes
at the first unfinished task of the first unfinished round. When a round's input has no unstable node, that
input is the final star forest: the ``labels`` step writes ``(node, label)`` per bucket (label = smallest node
of the component; nodes without edges are not listed and are their own component).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from curation.io.buckets import bucket_of_ranges, read_bucket, write_buckets
from curation.io.fs import join, write_parquet
from curation.io.parts import PartStore, part_name

__all__ = ["ComponentGraph", "LABELS", "run_components"]

EDGES = pa.schema([("u", pa.int64()), ("v", pa.int64())])
LABELS = pa.schema([("node", pa.int64()), ("label", pa.int64())])
MAX_ROUNDS = 200


@dataclass
class ComponentGraph:
    """One component computation: its work directory, bucket layout and round-0 input files."""

    name: str
    work: str
    """Directory of this computation (rounds in ``r<N>/``, labels in ``labels/``)."""
    starts: list[int]
    """First node id of every bucket (``starts[0] == 0``)."""
    store: PartStore
    config_hash: str

    @property
    def n_buckets(self) -> int:
        return len(self.starts)

    def round_files(self, r: int) -> list[str]:
        return [join(self.work, f"r{r}", part_name(k)) for k in range(self.n_buckets)]

    def label_url(self, k: int) -> str:
        return join(self.work, "labels", part_name(k))


def _round_part(g: ComponentGraph, inputs: list[str], r: int, k: int) -> dict[str, Any]:
    from curation.index.stars import large_star, small_star, undirected_rows, unstable_nodes

    t0 = time.perf_counter()
    t = read_bucket(inputs, k, EDGES)
    u, v = t["u"].to_numpy(), t["v"].to_numpy()
    unstable = unstable_nodes(u, v)
    a, b = (large_star if r % 2 == 0 else small_star)(u, v)
    u2, v2 = undirected_rows(a, b)
    table = pa.table({"u": pa.array(u2, pa.int64()), "v": pa.array(v2, pa.int64())}, schema=EDGES)
    write_buckets(join(g.work, f"r{r + 1}", part_name(k)), table, bucket_of_ranges(u2, np.array(g.starts)),
                  g.n_buckets)
    stats = {"part": k, "in": t.num_rows, "out": len(u2), "unstable": unstable,
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    g.store.mark_done(f"{g.name}-r{r}", k, stats, g.config_hash)
    return stats


def _labels_part(g: ComponentGraph, inputs: list[str], k: int) -> dict[str, Any]:
    from curation.index.stars import star_labels

    t = read_bucket(inputs, k, EDGES)
    nodes, labels = star_labels(t["u"].to_numpy(), t["v"].to_numpy())
    write_parquet(g.label_url(k), pa.table({"node": pa.array(nodes, pa.int64()),
                                            "label": pa.array(labels, pa.int64())}, schema=LABELS))
    stats = {"part": k, "in": t.num_rows, "out": len(nodes), "roots": int((nodes == labels).sum())}
    g.store.mark_done(f"{g.name}-labels", k, stats, g.config_hash)
    return stats


def run_components(stage: Any, executor: Any, g: ComponentGraph, inputs: list[str]) -> dict[str, Any]:
    """Run rounds from the round-0 ``inputs`` until the star forest is stable, then write the labels.

    ``stage`` is the calling :class:`curation.stages.base.Stage` (its ``run_parts`` gives markers and resume).
    Returns ``{"rounds": r, "labelled": nodes with an edge, "components_with_edges": roots}``.
    """
    r = 0
    while True:
        if r > MAX_ROUNDS:  # pragma: no cover - star contraction converges in O(log^2 n) rounds
            raise RuntimeError(f"{g.name}: components did not converge in {MAX_ROUNDS} rounds")
        parts = stage.run_parts(executor, f"{g.name}-r{r}", g.n_buckets, partial(_round_part, g, inputs, r))
        if sum(int(p["unstable"]) for p in parts) == 0:
            break
        inputs = g.round_files(r + 1)
        r += 1
    labels = stage.run_parts(executor, f"{g.name}-labels", g.n_buckets, partial(_labels_part, g, inputs))
    return {"rounds": r + 1, "labelled": sum(int(p["out"]) for p in labels),
            "components_with_edges": sum(int(p["roots"]) for p in labels)}  # fmt: skip
