"""Geometric verification of the dedupe stage's candidate pairs (``dedupe.verify``), as part-sized tasks.

With verification on, the descriptor only proposes candidates: the ``reduce`` step keeps each image's
``max_candidates`` best partners above ``candidate_threshold`` and writes every distinct pair ``(lo, hi)``
(``lo < hi`` global ids) bucketed by the block of ``hi``. Then

* ``locate`` (block ``b``): attaches to each pair the uid and source location (file or tar member) of ``hi``,
  read from the block's own manifest parts, and sends the pair to the verification range of ``lo``;
* ``verify`` (range ``r``: the block's gid range is cut into ``verify_split`` parts so a small pool still uses
  every CPU): checks its pairs best descriptor score first, skipping pairs whose images it already connected
  through verified pairs (their edge cannot change a component: verdict null, reason ``connected``); reads the
  local features of both images (extracted once per image by the ``features`` step,
  :mod:`curation.stages.verify_features`), checks the pair (:func:`curation.verify.check_pair`), and writes
  ``verify/part-b`` (both uids, descriptor score, inliers, inlier ratio, flipped, verdict, reason) plus the
  verified pairs as edges of the copy graph (and of the decontamination graph). An image that no longer
  decodes (changed or vanished source) gives its pairs the verdict false with the reason; the run goes on.

Only verified pairs become copy edges, so a component cannot grow through descriptor look-alikes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa

from curation.config import RunConfig
from curation.io.buckets import bucket_of_ranges, read_bucket, write_buckets
from curation.io.fs import read_parquet, write_parquet
from curation.io.parts import part_name
from curation.stages.components import EDGES
from curation.stages.copygraph import GraphJob

__all__ = ["CANDIDATES", "FeatureCache", "VERIFIED", "locate_part", "verify_part", "write_candidates"]

log = logging.getLogger(__name__)

CANDIDATES = pa.schema([("lo", pa.int64()), ("hi", pa.int64()), ("score", pa.float32())])
LOCATED = pa.schema([("lo", pa.int64()), ("hi", pa.int64()), ("score", pa.float32()), ("hi_uid", pa.string()),
                     ("uri", pa.string()), ("container", pa.string()), ("offset", pa.int64()),
                     ("size", pa.int64())])  # fmt: skip
#: ``verify/part-*``: one row per candidate pair.
VERIFIED = pa.schema([("uid", pa.string()), ("other_uid", pa.string()), ("score", pa.float32()),
                      ("inliers", pa.int32()), ("inlier_ratio", pa.float32()), ("flipped", pa.bool_()),
                      ("verdict", pa.bool_()), ("reason", pa.string())])  # fmt: skip
#: Verified partners, both directions, for each image's ``nearest_uid``.
PARTNERS = pa.schema([("gid", pa.int64()), ("score", pa.float32()), ("other_uid", pa.string())])
#: Feature bytes a verify task keeps cached (least recently used images are dropped first).
CACHE_BYTES = 256 << 20
_LOCATION = ["uid", "uri", "container", "offset", "size"]


def write_candidates(job: GraphJob, index: int, src: np.ndarray, dst: np.ndarray, score: np.ndarray) -> int:
    """Distinct undirected candidate pairs of a reduce block, bucketed by the block of their larger id."""
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    order = np.lexsort((-score.astype(np.float64), hi, lo))
    lo, hi, score = lo[order], hi[order], score[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])] if len(lo) else np.zeros(0, bool)
    lo, hi, score = lo[first], hi[first], score[first]
    table = pa.table({"lo": lo, "hi": hi, "score": score.astype(np.float32)}, schema=CANDIDATES)
    write_buckets(job.work("cand", part_name(index)), table, bucket_of_ranges(hi, job.block_starts),
                  len(job.blocks))
    return len(lo)


def _block_locations(job: GraphJob, manifest_urls: list[str], index: int,
                     locations: bool = True) -> tuple[list[str], dict[str, dict]]:  # fmt: skip
    """Uids of the block's vectors (gid order) and (with ``locations``) the manifest location of each."""
    p0, p1 = job.blocks[index]
    uids: list[str] = []
    where: dict[str, dict] = {}
    for p in range(p0, p1):
        uids += read_parquet(job.part_urls[p], columns=["uid"])["uid"].to_pylist()
        for row in read_parquet(manifest_urls[p], columns=_LOCATION).to_pylist() if locations else ():
            where[row["uid"]] = row
    return uids, where


def locate_part(job: GraphJob, manifest_urls: list[str], index: int) -> dict[str, Any]:
    """Attach the uid and location of every pair's ``hi`` image (in block ``index``); send to ``lo``'s block."""
    t0 = time.perf_counter()
    t = read_bucket([job.work("cand", part_name(b)) for b in range(len(job.blocks))], index, CANDIDATES)
    uids, where = _block_locations(job, manifest_urls, index)
    s0 = job.block_starts[index]
    hi = t["hi"].to_numpy()
    hi_uid = [uids[int(h - s0)] for h in hi]
    loc = [where[u] for u in hi_uid]
    table = pa.table({
        "lo": t["lo"], "hi": t["hi"], "score": t["score"], "hi_uid": pa.array(hi_uid, pa.string()),
        "uri": pa.array([r["uri"] for r in loc], pa.string()),
        "container": pa.array([r["container"] for r in loc], pa.string()),
        "offset": pa.array([r["offset"] for r in loc], pa.int64()),
        "size": pa.array([r["size"] for r in loc], pa.int64()),
    }, schema=LOCATED)  # fmt: skip
    write_buckets(job.work("located", part_name(index)), table, bucket_of_ranges(t["lo"].to_numpy(),
                                                                                 job.verify_starts), job.verify_tasks)
    stats = {"part": index, "in": t.num_rows, "out": t.num_rows, "seconds": round(time.perf_counter() - t0, 3)}
    job.store.mark_done("locate", index, stats, job.config_hash)
    return stats


class FeatureCache:
    """Local features per image, extracted once (decode, downscale, detect) and kept within a byte budget."""

    def __init__(self, config: RunConfig, budget: int = CACHE_BYTES) -> None:
        self.config = config
        self.budget = budget
        self.items: OrderedDict[str, Any] = OrderedDict()
        self.bytes = 0
        self.extracted = 0

    def get(self, uid: str, loc: dict[str, Any]) -> Any:
        """Features of image ``uid`` at ``loc``, or a string reason when it cannot be read or decoded."""
        from curation.stages.verify_features import extract_image

        if uid in self.items:
            self.items.move_to_end(uid)
            return self.items[uid]
        value = extract_image(self.config, loc)
        self.extracted += 1
        size = value.nbytes if hasattr(value, "nbytes") else 64
        self.items[uid] = value
        self.bytes += size
        while self.bytes > self.budget and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes if hasattr(old, "nbytes") else 64
        return value


def _edges(job: GraphJob, name: str, lo: np.ndarray, hi: np.ndarray, offset: int, index: int) -> None:
    from curation.index.stars import undirected_rows

    u, v = undirected_rows(lo + offset, hi + offset)
    starts = job.block_starts + offset
    starts[0] = 0
    table = pa.table({"u": pa.array(u, pa.int64()), "v": pa.array(v, pa.int64())}, schema=EDGES)
    write_buckets(job.work(name, "r0", part_name(index)), table, bucket_of_ranges(u, starts), len(job.blocks))


class _Forest:
    """Union-find over the gids of one task's verified pairs."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def verify_part(job: GraphJob, config: RunConfig, manifest_urls: list[str], decontam: bool,
                index: int) -> dict[str, Any]:  # fmt: skip
    """Verify the candidate pairs whose smaller id is in verification range ``index`` (see the module docstring).

    Pairs are checked best descriptor score first; a pair whose images this task already connected through
    verified pairs is not checked (verdict null, reason ``connected``): its edge could not change a component.
    """
    from curation.verify.geometry import check_pair

    t0 = time.perf_counter()
    t = read_bucket([job.work("located", part_name(b)) for b in range(len(job.blocks))], index, LOCATED)
    t = t.sort_by([("score", "descending"), ("lo", "ascending"), ("hi", "ascending")])
    from curation.stages.verify_features import load_features

    block = index // job.verify_split
    uids, _ = _block_locations(job, manifest_urls, block, locations=False)
    s0 = job.block_starts[block]
    feats = load_features(job, np.r_[t["lo"].to_numpy(), t["hi"].to_numpy()])
    forest = _Forest()
    rows = t.to_pylist()
    out: dict[str, list] = {k: [] for k in VERIFIED.names}
    ok = np.zeros(len(rows), bool)
    for i, r in enumerate(rows):
        lo_uid = uids[int(r["lo"] - s0)]
        check, reason, verdict = None, None, None
        if forest.find(r["lo"]) != forest.find(r["hi"]):
            fa, fb = feats[r["lo"]], feats[r["hi"]]
            if isinstance(fa, str) or isinstance(fb, str):
                reason, verdict = fa if isinstance(fa, str) else fb, False
            else:
                check = check_pair(fa, fb, config.dedupe.verification)
                verdict = bool(check.verdict)
                reason = None if verdict else "not verified"
                if verdict:
                    forest.union(r["lo"], r["hi"])
        else:
            reason = "connected"
        ok[i] = bool(verdict)
        out["uid"].append(lo_uid)
        out["other_uid"].append(r["hi_uid"])
        out["score"].append(r["score"])
        out["inliers"].append(check.inliers if check else 0)
        out["inlier_ratio"].append(check.ratio if check else 0.0)
        out["flipped"].append(bool(check.flipped) if check else False)
        out["verdict"].append(verdict)
        out["reason"].append(reason)
    write_parquet(job.store.data_url("verify", index), pa.table(out, schema=VERIFIED))
    lo, hi = t["lo"].to_numpy()[ok], t["hi"].to_numpy()[ok]
    _edges(job, "cc-dup", lo, hi, 0, index)
    if decontam:
        _edges(job, "cc-dec", lo, hi, job.ref_count, index)
    score = t["score"].to_numpy()[ok]
    lo_uid = [uids[int(x - s0)] for x in lo]
    hi_uid = [u for u, keep in zip(t["hi_uid"].to_pylist(), ok) if keep]
    partners = pa.table({"gid": np.r_[lo, hi], "score": np.r_[score, score].astype(np.float32),
                         "other_uid": pa.array(hi_uid + lo_uid, pa.string())}, schema=PARTNERS)  # fmt: skip
    write_buckets(job.work("partners", part_name(index)), partners,
                  bucket_of_ranges(partners["gid"].to_numpy(), job.block_starts), len(job.blocks))
    failed = sum(1 for x in out["reason"] if x not in (None, "not verified", "connected"))
    stats = {"part": index, "in": len(rows), "out": int(ok.sum()), "images": len(feats),
             "checked": sum(1 for x in out["verdict"] if x is not None),
             "connected": sum(1 for x in out["reason"] if x == "connected"),
             "unreadable_pairs": failed, "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("verify", index, stats, job.config_hash)
    return stats


def verified_partner(job: GraphJob, index: int) -> tuple[np.ndarray, list[str | None]]:
    """Per vector of block ``index`` (gid order): the best descriptor score among its verified partners and that
    partner's uid (-inf / None without one)."""
    t = read_bucket([job.work("partners", part_name(b)) for b in range(job.verify_tasks)], index, PARTNERS)
    s0, s1 = int(job.block_starts[index]), int(job.block_starts[index + 1])
    best = np.full(s1 - s0, -np.inf, np.float32)
    other: list[str | None] = [None] * (s1 - s0)
    gid, score, uid = t["gid"].to_numpy(), t["score"].to_numpy(), t["other_uid"].to_pylist()
    for i in sorted(range(len(uid)), key=lambda j: (gid[j], -score[j], uid[j])):
        g = int(gid[i]) - s0
        if other[g] is None:
            best[g], other[g] = score[i], uid[i]
    return best, other
