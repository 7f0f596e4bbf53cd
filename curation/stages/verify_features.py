"""Local features of the dedupe stage's candidate images, extracted once per image (``dedupe.verify``).

The ``features`` step runs one task per verification range (the gid ranges of :attr:`GraphJob.verify_starts`):
it finds the images of its range that take part in a candidate pair (as the smaller id: ``located`` bucket of
the range; as the larger id: the ``cand`` bucket of its block), reads each one's bytes through the manifest (any
fsspec source, tar members included), decodes it once at a reduced size, extracts its local features
(:func:`curation.verify.features.extract`) and appends them to ``work/features/part-r.bin``, indexed by
``part-r.parquet`` (gid, offset, size, reason). An image that cannot be read or decoded gets a reason and no
bytes, so its pairs are recorded as unverifiable instead of failing the run.

:func:`load_features` gives a verification task the features of the images it needs: for each range it reads the
small index and fetches only the needed byte ranges of the ``.bin`` file (``cat_ranges``), so a task holds the
features of its own pairs' images, never a whole pool's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from curation.config import RunConfig
from curation.decode import DecodeError, load_rgb
from curation.io.buckets import read_bucket
from curation.io.fs import atomic_write_bytes, get_fs, read_parquet, write_parquet
from curation.io.parts import part_name
from curation.io.sources import read_location
from curation.stages.copygraph import GraphJob

__all__ = ["FEATURE_INDEX", "extract_image", "features_part", "load_features"]

log = logging.getLogger(__name__)

#: ``work/features/part-r.parquet``: where each image's features lie in ``part-r.bin`` (reason when unreadable).
FEATURE_INDEX = pa.schema([("gid", pa.int64()), ("offset", pa.int64()), ("size", pa.int64()),
                           ("reason", pa.string())])  # fmt: skip
_LOCATION = ["uid", "uri", "container", "offset", "size"]


def extract_image(config: RunConfig, loc: dict[str, Any]) -> Any:
    """Local features of the image at manifest location ``loc``, or a string reason when it cannot be read."""
    from curation.verify.features import extract

    vcfg = config.dedupe.verification
    try:
        data = read_location(loc["uri"], loc["container"], int(loc["offset"]), int(loc["size"]))
        img = load_rgb(data, config.ingest.decode, draft_size=(vcfg.max_side, vcfg.max_side))
        return extract(img, vcfg)
    except DecodeError as exc:
        return f"decode:{exc.reason}"
    except (OSError, ValueError) as exc:
        log.warning("verify: cannot read %s: %s", loc["uri"], exc)
        return "unreadable"


def _needed(job: GraphJob, index: int) -> np.ndarray:
    """Sorted gids of range ``index`` that are in at least one candidate pair."""
    from curation.stages.verify_steps import CANDIDATES, LOCATED

    lo = read_bucket([job.work("located", part_name(b)) for b in range(len(job.blocks))], index, LOCATED,
                     columns=["lo"])["lo"].to_numpy()  # fmt: skip
    block = index // job.verify_split
    hi = read_bucket([job.work("cand", part_name(b)) for b in range(len(job.blocks))], block, CANDIDATES,
                     columns=["hi"])["hi"].to_numpy()  # fmt: skip
    r0, r1 = job.verify_starts[index], job.verify_starts[index + 1]
    hi = hi[(hi >= r0) & (hi < r1)]
    return np.unique(np.r_[lo, hi]).astype(np.int64)


def _locations(job: GraphJob, manifest_urls: list[str], gids: np.ndarray, block: int) -> list[dict[str, Any]]:
    """Manifest rows (uid, uri, container, offset, size) of ``gids`` (all in ``block``), in gid order."""
    p0, p1 = job.blocks[block]
    rows: list[dict[str, Any]] = []
    for p in range(p0, p1):
        a, b = job.part_starts[p], job.part_starts[p + 1]
        want = gids[(gids >= a) & (gids < b)]
        if not len(want):
            continue
        uids = read_parquet(job.part_urls[p], columns=["uid"])["uid"].to_pylist()
        where = {r["uid"]: r for r in read_parquet(manifest_urls[p], columns=_LOCATION).to_pylist()}
        rows += [where[uids[int(g - a)]] for g in want]
    return rows


def features_part(job: GraphJob, config: RunConfig, manifest_urls: list[str], index: int) -> dict[str, Any]:
    """Extract the local features of every candidate image of verification range ``index`` (module docstring)."""
    t0 = time.perf_counter()
    gids = _needed(job, index)
    locs = _locations(job, manifest_urls, gids, index // job.verify_split)
    blobs, offsets, sizes, reasons = [], [], [], []
    pos = 0
    for loc in locs:
        value = extract_image(config, loc)
        blob = b"" if isinstance(value, str) else value.to_bytes()
        offsets.append(pos)
        sizes.append(len(blob))
        reasons.append(value if isinstance(value, str) else None)
        blobs.append(blob)
        pos += len(blob)
    atomic_write_bytes(job.work("features", part_name(index, "bin")), b"".join(blobs))
    write_parquet(job.work("features", part_name(index)), pa.table({
        "gid": pa.array(gids, pa.int64()), "offset": pa.array(offsets, pa.int64()),
        "size": pa.array(sizes, pa.int64()), "reason": pa.array(reasons, pa.string())}, schema=FEATURE_INDEX))
    stats = {"part": index, "in": len(gids), "out": sum(r is None for r in reasons),
             "unreadable": sum(r is not None for r in reasons), "bytes": pos,
             "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    job.store.mark_done("features", index, stats, job.config_hash)
    return stats


def load_features(job: GraphJob, gids: Iterable[int]) -> dict[int, Any]:
    """``{gid: LocalFeatures or reason}`` for ``gids``, reading only their byte ranges of the feature files."""
    from curation.verify.features import LocalFeatures

    want = np.unique(np.fromiter(gids, np.int64))
    starts = job.verify_starts
    out: dict[int, Any] = {}
    for r in np.unique(np.searchsorted(starts, want, side="right") - 1).tolist():
        idx = read_parquet(job.work("features", part_name(r)))
        g = idx["gid"].to_numpy()
        pos = np.searchsorted(g, want[(want >= starts[r]) & (want < starts[r + 1])])
        rows = idx.take(pa.array(pos)).to_pylist()
        fetch = [x for x in rows if x["reason"] is None]
        for x in rows:
            if x["reason"] is not None:
                out[x["gid"]] = x["reason"]
        if fetch:
            fs, path = get_fs(job.work("features", part_name(r, "bin")))
            data = fs.cat_ranges([path] * len(fetch), [x["offset"] for x in fetch],
                                 [x["offset"] + x["size"] for x in fetch])  # fmt: skip
            for x, blob in zip(fetch, data):
                out[x["gid"]] = LocalFeatures.from_bytes(blob)
    return out
