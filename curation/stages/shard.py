"""Shard: WebDataset tars of the selected images, with per-sample lineage, deterministic and resumable.

The driver plans once: the selected uids (``shard.selection``: the retrieve stage's ``selection/``, the cluster
stage's balanced sample, or every image dedupe kept) joined with their manifest row, copy-detection component
and cluster ids, sorted by uid and globally shuffled under the run seed, then cut into shards of
``samples_per_shard`` (and at most ``max_shard_bytes``). The plan is frozen in ``_work/shard/plan-<hash>.parquet``.
One task per shard then reads each image from its source (file or tar member by offset), writes the members

* ``<uid>.jpg`` - the original bytes, or re-encoded JPEG (``shard.reencode``, ``shard.max_side``); with
  ``reencode = "never"`` PNG and WebP sources keep their bytes and extension (``<uid>.png``, ``<uid>.webp``), other
  formats (BMP, TIFF, GIF) are re-encoded to JPEG: image members only ever have an extension of the WebDataset
  sample contract (:mod:`pretrain.utils.wds_sample`), the ones the pretraining and eval readers accept;
* ``<uid>.json`` - lineage: source URI (and every URI with these bytes), container/offset, source format and
  size, stored size, dedup component, clusters ``l1..lK``, selection reason, seed set, seed uid and score, label;
* ``<uid>.cls`` - the integer label, when ``shard.label_from`` finds one,

to ``shards/{prefix}-{NNNNNN}.tar`` atomically (temporary name, then rename) with deterministic headers (USTAR,
mtime 0, uid/gid 0, mode 0644, members of a sample contiguous and in name order), then its marker. A rerun skips
finished shards; the same inputs and seed give byte-identical shards. ``shards/index.json`` lists every shard's
name, sample count, bytes and sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from curation.config import RunConfig, ShardConfig
from curation.decode import DecodeError, load_rgb
from curation.io.artifacts import (
    CLUSTERS_DIR,
    DEDUP_DIR,
    MANIFEST_DIR,
    SELECTION_DIR,
    SHARDS_DIR,
    load_assignments,
    manifest_parts,
)
from curation.io.fs import exists, get_fs, join, read_json, read_parquet, write_json, write_parquet
from curation.io.parts import PartStore, part_name
from curation.io.sources import read_location
from curation.schemas import SELECTION
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.dedupe import DedupeStage
from pretrain.utils.wds_sample import IMAGE_EXTENSIONS, LABEL_KEY, METADATA_KEY

__all__ = ["ShardStage", "encode_image", "label_of", "shard_name", "write_tar"]

log = logging.getLogger(__name__)

#: Pillow formats stored with their original bytes (when ``shard.reencode`` allows) and their member extension:
#: only extensions of the sample contract, so every reader takes the image; other formats are re-encoded to JPEG.
_EXT = {fmt: ext for fmt, ext in {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.items() if ext in IMAGE_EXTENSIONS}
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
_JSON_ESTIMATE = 1024


def shard_name(prefix: str, index: int) -> str:
    """``{prefix}-{index:06d}.tar``."""
    return f"{prefix}-{index:06d}.tar"


def label_of(uri: str, cfg: ShardConfig) -> int | None:
    """The class label of a source URI under ``cfg.label_from`` (None when it carries none)."""
    if cfg.label_from == "none":
        return None
    path = uri.split("#", 1)[1] if "#" in uri else uri  # tar members: the directory inside the tar
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    if len(parts) < 2:
        return None
    name = parts[-2]
    if cfg.classes:
        return cfg.classes.index(name) if name in cfg.classes else None
    return int(name) if name.isdigit() else None


def encode_image(data: bytes, fmt: str, width: int, height: int, cfg: ShardConfig, limits: Any
                 ) -> tuple[bytes, str, int, int, bool]:  # fmt: skip
    """Bytes to store for an image of manifest ``fmt``/``width``/``height``: ``(bytes, extension, width, height,
    reencoded)`` under ``cfg``. Kept bytes are returned untouched; anything else (and, whatever ``cfg.reencode``, any
    format whose extension is outside the sample contract) is decoded (EXIF orientation, RGB conversion),
    downscaled to ``max_side`` when larger, and encoded as JPEG."""
    fmt = (fmt or "").upper()
    resize = bool(cfg.max_side) and max(width, height) > cfg.max_side
    keep = cfg.reencode == "never" or (cfg.reencode == "non_jpeg" and fmt == "JPEG")
    if keep and not resize and fmt in _EXT:
        return data, _EXT[fmt], width, height, False
    img = load_rgb(data, limits)
    if cfg.max_side and max(img.size) > cfg.max_side:
        scale = cfg.max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), "jpg", img.width, img.height, True


class _HashingWriter:
    """File wrapper counting and sha256-hashing everything written through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


@contextmanager
def _atomic_file(url: str) -> Iterator[BinaryIO]:
    """A writable file that appears at ``url`` complete or not at all (object stores: PUT on close)."""
    fs, path = get_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if _OBJECT_STORES.intersection(protocols):
        with fs.open(path, "wb") as f:
            yield f
        return
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def write_tar(f: BinaryIO, samples: list[tuple[str, dict[str, bytes]]]) -> tuple[int, str]:
    """Write ``[(key, {ext: bytes})]`` as a deterministic tar to ``f``; returns ``(bytes, sha256)``."""
    out = _HashingWriter(f)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
        for key, members in samples:
            for ext in sorted(members):
                data = members[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return out.bytes, out.sha.hexdigest()


def _sample(row: dict[str, Any], config: RunConfig, shard: str) -> tuple[dict[str, bytes], int]:
    """The members of one sample (raises ``DecodeError``/``OSError``/``ValueError`` when unreadable)."""
    cfg = config.shard
    data = read_location(row["uri"], row["container"], int(row["offset"]), int(row["size"]))
    img, ext, w, h, reencoded = encode_image(data, row["format"], int(row["width"]), int(row["height"]), cfg,
                                             config.ingest.decode)
    meta = {
        "uid": row["uid"], "source": row["uri"], "uris": row["uris"], "container": row["container"],
        "offset": row["offset"], "source_format": row["format"], "source_bytes": row["size"],
        "width": row["width"], "height": row["height"],
        "stored": {"ext": ext, "bytes": len(img), "width": w, "height": h, "reencoded": reencoded},
        "component": row["component"], "clusters": row["clusters"],
        "selection": {k: row[k] for k in ("reason", "seed_set", "seed_uid", "score", "n_seeds")},
        "label": row["label"], "class": row["class"], "shard": shard,
    }  # fmt: skip
    members = {ext: img, METADATA_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()}
    if row["label"] is not None:
        members[LABEL_KEY] = str(row["label"]).encode()
    return members, len(img)


def shard_part(config: RunConfig, plan_url: str, store: PartStore, config_hash: str, index: int) -> dict[str, Any]:
    """Write shard ``index`` of the plan, then its marker; return its stats (count, bytes, sha256)."""
    t0 = time.perf_counter()
    fs, path = get_fs(plan_url)
    with fs.open(path, "rb") as f:
        rows = pq.read_table(f, filters=[("shard", "=", index)]).sort_by("position").to_pylist()
    name = shard_name(config.shard.prefix, index)
    samples: list[tuple[str, dict[str, bytes]]] = []
    rejected: Counter[str] = Counter()
    image_bytes = 0
    for row in rows:
        try:
            members, n = _sample(row, config, name)
        except DecodeError as exc:
            rejected[exc.reason] += 1
            continue
        except (OSError, ValueError) as exc:
            log.warning("shard %s: cannot read %s: %s", name, row["uri"], exc)
            rejected["unreadable"] += 1
            continue
        samples.append((row["uid"], members))
        image_bytes += n
    with _atomic_file(join(store.output, name)) as f:
        n_bytes, sha = write_tar(f, samples)
    stats = {
        "part": index, "name": name, "in": len(rows), "out": len(samples), "count": len(samples),
        "bytes": n_bytes, "image_bytes": image_bytes, "sha256": sha, "rejected": dict(sorted(rejected.items())),
        "labelled": sum(LABEL_KEY in m for _, m in samples), "seconds": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
    store.mark_done("shard", index, stats, config_hash)
    return stats


def _estimate(size: int) -> int:
    """Tar bytes of one sample: image, JSON (<= 1 KiB assumed) and cls members, each a header plus padded data."""
    return 512 + -(-size // 512) * 512 + 512 + _JSON_ESTIMATE + 512 + 512


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

    def _selected(self, source: str) -> pa.Table:
        if source == "selection":
            rec = read_json(join(self.run_dir, SELECTION_DIR, "_SUCCESS.json"))
            return pa.concat_tables([read_parquet(join(self.run_dir, SELECTION_DIR, part_name(i)), schema=SELECTION)
                                     for i in range(int(rec["selection_parts"]))])  # fmt: skip
        if source == "balanced":
            return read_parquet(join(self.run_dir, CLUSTERS_DIR, "balanced", part_name(0)), schema=SELECTION)
        rec = read_json(join(self.run_dir, DEDUP_DIR, "_SUCCESS.json"))
        kept = []
        for i in range(int(rec["dedup_parts"])):
            t = read_parquet(join(self.run_dir, DEDUP_DIR, part_name(i)), columns=["uid", "keep"])
            kept += [u for u, k in zip(t["uid"].to_pylist(), t["keep"].to_pylist()) if k]
        n = len(kept)
        return pa.table({"uid": pa.array(kept, pa.string()), "reason": pa.array(["kept"] * n, pa.string()),
                         "seed_set": pa.nulls(n, pa.string()), "seed_uid": pa.nulls(n, pa.string()),
                         "score": pa.nulls(n, pa.float32()), "n_seeds": pa.nulls(n, pa.int32())},
                        schema=SELECTION)  # fmt: skip

    def _plan(self) -> tuple[str, int, str, int]:
        """Build (or reuse) the frozen plan; ``(plan url, number of shards, selection source, selected images)``."""
        url = join(self.store.work, f"plan-{self.config_hash}.parquet")
        source = self._source()
        sel = self._selected(source).sort_by("uid")
        if exists(url):
            t = read_parquet(url, columns=["shard"])
            return url, int(pc.max(t["shard"]).as_py()) + 1 if t.num_rows else 0, source, sel.num_rows
        cfg = self.config.shard
        rows = {r["uid"]: r for r in sel.to_pylist()}
        info: dict[str, dict[str, Any]] = {}
        for part in manifest_parts(PartStore(self.run_dir, "ingest", MANIFEST_DIR)):
            for r in read_parquet(part).to_pylist():
                if r["uid"] in rows:
                    info[r["uid"]] = r
        missing = [u for u in rows if u not in info]
        if missing:
            raise ValueError(f"{len(missing)} selected uids are not in the manifest of {self.run_dir} (e.g. "
                             f"{missing[0]}); the selection belongs to another run")  # fmt: skip
        component: dict[str, int] = {}
        rec = read_json(join(self.run_dir, DEDUP_DIR, "_SUCCESS.json"))
        for i in range(int(rec["dedup_parts"])):
            t = read_parquet(join(self.run_dir, DEDUP_DIR, part_name(i)), columns=["uid", "component"])
            component.update((u, c) for u, c in zip(t["uid"].to_pylist(), t["component"].to_pylist()) if u in rows)
        clusters: dict[str, dict[str, int]] = {}
        if read_json(join(self.run_dir, CLUSTERS_DIR, "_SUCCESS.json")) is not None:
            a = load_assignments(self.run_dir)
            levels = [c for c in a.column_names if c.startswith("l") and c[1:].isdigit()]
            for r in a.to_pylist():
                if r["uid"] in rows:
                    clusters[r["uid"]] = {lv: r[lv] for lv in levels}
        uids = sel["uid"].to_pylist()
        order = np.random.default_rng(self.config.seed).permutation(len(uids)) if cfg.shuffle else np.arange(len(uids))
        plan: list[dict[str, Any]] = []
        for j in order.tolist():
            u = uids[j]
            m = info[u]
            label = label_of(m["uri"], cfg)
            if label is None and cfg.unlabelled == "drop":
                continue
            pos = len(plan)
            plan.append({**rows[u], **{k: m[k] for k in ("uri", "uris", "container", "offset", "size", "width",
                                                            "height", "format")},
                         "position": pos, "component": component.get(u), "clusters": clusters.get(u),
                         "label": label, "class": cfg.classes[label] if label is not None and cfg.classes else None})
        est = np.array([_estimate(int(p["size"])) for p in plan], np.int64)
        shards = _cut(est, cfg.samples_per_shard, cfg.max_shard_bytes)
        for p, s in zip(plan, shards.tolist()):
            p["shard"] = s
        table = pa.Table.from_pylist(plan) if plan else pa.table({"shard": pa.array([], pa.int64())})
        write_parquet(url, table)
        return url, int(shards.max()) + 1 if len(shards) else 0, source, sel.num_rows

    def run(self, executor: Executor) -> dict[str, Any]:
        cfg = self.config.shard
        plan_url, n_shards, source, selected = self._plan()
        log.info("shard: %d shards of <= %d samples from %s", n_shards, cfg.samples_per_shard, source)
        parts = self.run_parts(executor, "shard", n_shards,
                               partial(shard_part, self.config, plan_url, self.store, self.config_hash))  # fmt: skip
        shards = [{k: p[k] for k in ("name", "count", "bytes", "sha256")} for p in parts]
        total = sum(s["count"] for s in shards)
        rejected: Counter[str] = Counter()
        for p in parts:
            rejected.update(p.get("rejected", {}))
        planned = sum(p["in"] for p in parts)
        if selected > planned:
            rejected["unlabelled"] = selected - planned
        pattern = f"{cfg.prefix}-{{{0:06d}..{max(0, n_shards - 1):06d}}}.tar"
        index = {"prefix": cfg.prefix, "pattern": pattern, "shards": shards, "count": total,
                 "bytes": sum(s["bytes"] for s in shards), "selection": source, "seed": self.config.seed,
                 "shuffle": cfg.shuffle, "labelled": sum(p["labelled"] for p in parts),
                 "config_hash": self.config_hash}  # fmt: skip
        write_json(join(self.store.output, "index.json"), index)
        return {"in": selected, "out": total, "rejected": dict(sorted(rejected.items())),
                "shards": n_shards, "pattern": pattern, "selection": source, "bytes": index["bytes"],
                "labelled": index["labelled"], "rows": {"samples": total}}  # fmt: skip
