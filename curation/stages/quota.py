"""Per-cluster quotas over the assignment parts: the ``quota[c]`` leaves of every level-1 cluster ``c`` with the
smallest tie key (ties: the smaller leaf index), found without gathering the pool.

This is the leaf step of water-filling (:func:`curation.index.waterfill` with unit sizes), as the balanced sample
(:func:`curation.index.balanced_sample`) and the cluster retrieval (:func:`curation.index.retrieve_by_cluster`)
end. Leaves are numbered in ``clusters/assign`` part order (the leaf index); their tie keys are

* ``random``: the draws of ``np.random.default_rng(seed)`` after ``skip`` draws of the levels above; a part whose
  first leaf is ``offset`` regenerates exactly its own keys by advancing the PCG64 bit generator by ``skip +
  offset`` (``random()`` consumes one 64-bit output per double). A key is kept as the exact integer
  ``key * 2**53``;
* ``closest``: the distance to the level-1 centroid, as the order-preserving uint64 of its float64 bits.

The threshold of a cluster, the largest (key, leaf index) picked, is searched in rounds. Each round is one step
with a task per assignment part: for every open cluster the task counts its leaves per bin of the cluster's
bracket (``bins`` bins, sparse counts), or returns them once the bracket holds at most ``bins`` leaves. The
driver sums the counts (``open clusters x bins`` cells, at most ``CELLS``), narrows every bracket to the bin of
the quota-th leaf and closes a cluster from its returned leaves. A bracket down to one key value goes on over the
leaf index. Rounds: about ``log(cluster size) / log(bins)`` + 1 with spread keys; at most ``(64 + 40) / log2(bins)``
+ 1. Memory: a task holds one part and the brackets (a few numbers per cluster); the driver the summed cells.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from curation.io.fs import atomic_write_bytes, get_fs, join, read_parquet
from curation.io.parts import PartStore
from curation.stages.base import Executor, Stage

__all__ = ["CELLS", "MAX_BINS", "LeafKeys", "Thresholds", "quota_thresholds"]

#: Most histogram cells (open clusters x bins) a round sums in the driver.
CELLS = 1 << 22
#: Most bins per cluster and round; a bracket holding at most this many leaves is collected exactly.
MAX_BINS = 256
_UMAX = np.uint64(np.iinfo(np.uint64).max)
_IMAX = np.iinfo(np.int64).max


def sortable(x: np.ndarray) -> np.ndarray:
    """uint64 keys ordered like the float64 values ``x`` (``-0.0`` counts as ``0.0``)."""
    bits = (np.asarray(x, dtype=np.float64) + 0.0).view(np.uint64)
    return np.where(bits >> np.uint64(63) == 1, ~bits, bits | np.uint64(1 << 63))


@dataclass(frozen=True)
class LeafKeys:
    """How the tie keys of the leaves of the assignment parts are made (see the module docstring)."""

    urls: list[str]
    """``clusters/assign`` parts, in order."""
    offsets: list[int]
    """Leaf index of the first row of every part."""
    strategy: str
    """``random`` or ``closest``."""
    seed: int
    skip: int
    """Draws of the run seed's generator before the leaf keys."""

    @property
    def n_leaves(self) -> int:
        return self.offsets[-1] if self.offsets else 0

    def read(self, index: int, columns: tuple[str, ...] = ()) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
        """``(table with l1, dist and columns, level-1 cluster, key, leaf index)`` of part ``index``."""
        t = read_parquet(self.urls[index], columns=["l1", "dist", *columns])
        l1 = np.asarray(t["l1"].to_numpy(zero_copy_only=False), np.int64)
        if self.strategy == "closest":
            key = sortable(np.asarray(t["dist"].to_numpy(zero_copy_only=False), np.float64))
        else:
            rng = np.random.default_rng(self.seed)
            rng.bit_generator.advance(self.skip + self.offsets[index])
            key = (rng.random(t.num_rows) * 2.0**53).astype(np.uint64)
        return t, l1, key, self.offsets[index] + np.arange(t.num_rows, dtype=np.int64)


@dataclass(frozen=True)
class Thresholds:
    """The largest (key, leaf index) picked in every level-1 cluster."""

    key: np.ndarray
    leaf: np.ndarray

    def picked(self, l1: np.ndarray, key: np.ndarray, leaf: np.ndarray) -> np.ndarray:
        """Mask of the leaves at or below their cluster's threshold."""
        tk, tl = self.key[l1], self.leaf[l1]
        return (key < tk) | ((key == tk) & (leaf <= tl))


@dataclass(frozen=True)
class _Round:
    """Brackets of the open clusters in one round (arrays over the open clusters, sorted by cluster)."""

    cluster: np.ndarray
    collect: np.ndarray  # bool: return the bracket's leaves instead of counting them
    by_leaf: np.ndarray  # bool: bins over the leaf index (the bracket is one key value)
    klo: np.ndarray
    khi: np.ndarray
    llo: np.ndarray
    lhi: np.ndarray
    bins: int


def _save(url: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(url, buf.getvalue())


def _load(url: str) -> dict[str, np.ndarray]:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        return {k: data[k] for k in data.files}


def scan_part(keys: LeafKeys, rnd: _Round, store: PartStore, step: str, config_hash: str, index: int) -> dict[str, Any]:
    """One part's share of a round: sparse bin counts per open cluster, and the leaves of collected brackets."""
    t0 = time.perf_counter()
    _, l1, key, leaf = keys.read(index)
    slot = np.searchsorted(rnd.cluster, l1)
    ok = slot < len(rnd.cluster)
    ok[ok] = rnd.cluster[slot[ok]] == l1[ok]
    s = slot[ok]
    key, leaf = key[ok], leaf[ok]
    inside = (key >= rnd.klo[s]) & (key <= rnd.khi[s]) & (leaf >= rnd.llo[s]) & (leaf <= rnd.lhi[s])
    s, key, leaf = s[inside], key[inside], leaf[inside]
    take = rnd.collect[s]
    h = ~take
    hs, hk, hl = s[h], key[h], leaf[h]
    kw = (rnd.khi[hs] - rnd.klo[hs]) // np.uint64(rnd.bins) + np.uint64(1)
    lw = (rnd.lhi[hs] - rnd.llo[hs]) // rnd.bins + 1
    by_leaf = rnd.by_leaf[hs]
    b = np.where(by_leaf, (hl - rnd.llo[hs]) // lw, ((hk - rnd.klo[hs]) // kw).astype(np.int64))
    cells, counts = np.unique(hs * rnd.bins + b, return_counts=True)
    _save(join(store.work, step, f"part-{index:05d}.npz"), cells=cells, counts=counts.astype(np.int64),
          slot=s[take], key=key[take], leaf=leaf[take], bins=np.array(rnd.bins))  # fmt: skip
    stats = {"part": index, "in": len(l1), "out": len(cells) + int(take.sum()),
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    store.mark_done(step, index, stats, config_hash)
    return stats


def _bins(n_open: int) -> int:
    return int(max(2, min(MAX_BINS, CELLS // max(1, n_open))))


def quota_thresholds(stage: Stage, executor: Executor, name: str, keys: LeafKeys, counts: np.ndarray,
                     quota: np.ndarray) -> Thresholds:  # fmt: skip
    """Thresholds picking ``quota[c]`` of the ``counts[c]`` leaves of every cluster ``c``: steps ``name-rK``, then
    the marker ``name-final`` holding the thresholds (so the round data may be deleted once the stage is done)."""
    final = stage.store.done(f"{name}-final", stage.config_hash)
    if 0 in final:
        return Thresholds(np.array(final[0]["key"], np.uint64), np.array(final[0]["leaf"], np.int64))
    counts = np.asarray(counts, np.int64)
    quota = np.asarray(quota, np.int64)
    if np.any(quota > counts) or np.any(quota < 0):
        raise ValueError("quota_thresholds: every quota must lie in [0, cluster size]")
    tk = np.zeros(len(counts), np.uint64)
    tl = np.full(len(counts), -1, np.int64)
    full = quota == counts
    tk[full], tl[full] = _UMAX, _IMAX
    cluster = np.flatnonzero((quota > 0) & (quota < counts)).astype(np.int64)
    need, n_in = quota[cluster], counts[cluster]
    klo = np.zeros(len(cluster), np.uint64)
    khi = np.full(len(cluster), _UMAX if keys.strategy == "closest" else np.uint64(2**53 - 1), np.uint64)
    llo = np.zeros(len(cluster), np.int64)
    lhi = np.full(len(cluster), max(0, keys.n_leaves - 1), np.int64)
    r = 0
    while len(cluster):
        bins = _bins(len(cluster))
        rnd = _Round(cluster, n_in <= bins, klo == khi, klo, khi, llo, lhi, bins)
        step = f"{name}-r{r}"
        stage.run_parts(executor, step, len(keys.urls),
                        partial(scan_part, keys, rnd, stage.store, step, stage.config_hash))  # fmt: skip
        hist = np.zeros(len(cluster) * bins, np.int64)
        got: list[dict[str, np.ndarray]] = []
        for p in range(len(keys.urls)):
            d = _load(join(stage.store.work, step, f"part-{p:05d}.npz"))
            if int(d["bins"]) != bins:
                raise ValueError(f"{stage.store.work}/{step} was computed with {int(d['bins'])} bins, this code "
                                 f"uses {bins}: delete {stage.store.work} to restart the stage")  # fmt: skip
            np.add.at(hist, d["cells"], d["counts"])
            if len(d["slot"]):
                got.append(d)
        done = rnd.collect.copy()
        if got:  # collected brackets: the need-th smallest (key, leaf) of each
            slot, key, leaf = (np.concatenate([d[k] for d in got]) for k in ("slot", "key", "leaf"))
            order = np.lexsort((leaf, key, slot))
            slot, key, leaf = slot[order], key[order], leaf[order]
            start = np.searchsorted(slot, np.arange(len(cluster)))
            c = np.flatnonzero(rnd.collect)
            assert np.array_equal(np.bincount(slot, minlength=len(cluster))[c], n_in[c]), "lost leaves"
            pos = start[c] + need[c] - 1
            tk[cluster[c]], tl[cluster[c]] = key[pos], leaf[pos]
        h = np.flatnonzero(~rnd.collect)
        hh = hist.reshape(len(cluster), bins)[h]
        assert np.array_equal(hh.sum(axis=1), n_in[h]), "lost leaves"  # internal invariant: consistent keys
        cum = np.cumsum(hh, axis=1)
        j = (cum < need[h, None]).sum(axis=1)
        need[h] -= np.where(j > 0, cum[np.arange(len(h)), np.maximum(j - 1, 0)], 0)
        n_in[h] = hh[np.arange(len(h)), j]
        on_key = ~rnd.by_leaf[h]
        hk = h[on_key]
        kw = (khi[hk] - klo[hk]) // np.uint64(bins) + np.uint64(1)
        lo = klo[hk] + j[on_key].astype(np.uint64) * kw
        khi[hk] = np.where(lo > khi[hk] - (kw - np.uint64(1)), khi[hk], lo + kw - np.uint64(1))
        klo[hk] = lo
        hl = h[~on_key]
        lw = (lhi[hl] - llo[hl]) // bins + 1
        lo_l = llo[hl] + j[~on_key] * lw
        lhi[hl] = np.minimum(lhi[hl], lo_l + lw - 1)
        llo[hl] = lo_l
        keep = ~done
        cluster, need, n_in = cluster[keep], need[keep], n_in[keep]
        klo, khi, llo, lhi = klo[keep], khi[keep], llo[keep], lhi[keep]
        r += 1
    stage.store.mark_done(f"{name}-final", 0, {"rounds": r, "key": tk.tolist(), "leaf": tl.tolist()},
                          stage.config_hash)  # fmt: skip
    return Thresholds(tk, tl)
