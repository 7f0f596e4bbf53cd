"""The shard writer: one task per shard reads its planned rows, each image from its source, and writes a
deterministic WebDataset tar atomically, then its marker (see :mod:`curation.stages.shard` for the members).

A shard task holds one shard: its rows of the group plan (``samples_per_shard`` rows, read by row-group
statistics) and their encoded images.
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from curation.config import RunConfig, ShardConfig
from curation.decode import DecodeError, load_rgb
from curation.io.fs import get_fs, join
from curation.io.parts import PartStore
from curation.io.sources import read_location
from pretrain.utils.wds_sample import IMAGE_EXTENSIONS, LABEL_KEY, METADATA_KEY

__all__ = ["encode_image", "label_of", "shard_name", "shard_part", "write_tar"]

log = logging.getLogger(__name__)

#: Pillow formats stored with their original bytes (when ``shard.reencode`` allows) and their member extension:
#: only extensions of the sample contract, so every reader takes the image; other formats are re-encoded to JPEG.
_EXT = {fmt: ext for fmt, ext in {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.items() if ext in IMAGE_EXTENSIONS}
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}


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


def _sample(row: dict[str, Any], config: RunConfig, shard: str, run_dir: str = "") -> tuple[dict[str, bytes], int]:
    """The members of one sample (raises ``DecodeError``/``OSError``/``ValueError`` when unreadable)."""
    cfg = config.shard
    data = read_location(row["uri"], row["container"], int(row["offset"]), int(row["size"]))
    img, ext, w, h, reencoded = encode_image(
        data, row["format"], int(row["width"]), int(row["height"]), cfg, config.ingest.decode
    )
    meta = {
        "uid": row["uid"], "source": row["uri"], "uris": row["uris"], "container": row["container"],
        "offset": row["offset"], "source_format": row["format"], "source_bytes": row["size"],
        "width": row["width"], "height": row["height"],
        "stored": {"ext": ext, "bytes": len(img), "width": w, "height": h, "reencoded": reencoded},
        "component": row["component"], "clusters": row.get("clusters"),
        "selection": {k: row[k] for k in ("reason", "seed_set", "seed_uid", "score", "n_seeds")},
        "label": row["label"], "class": row["class"], "shard": shard,
    }  # fmt: skip
    if config.base:  # an increment: name the run that brought the image and the base it continues
        meta["increment"] = {"run": run_dir, "base": config.base}
    members = {ext: img, METADATA_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()}
    if row["label"] is not None:
        members[LABEL_KEY] = str(row["label"]).encode()
    return members, len(img)


def shard_part(config: RunConfig, store: PartStore, config_hash: str, plan_urls: Sequence[str],
               offsets: Sequence[int], index: int, first: int = 0) -> dict[str, Any]:  # fmt: skip
    """Write shard ``index`` (its rows are local shard ``index - offsets[g]`` of group plan ``plan_urls[g]``) as
    shard number ``first + index`` (an increment continues its base's numbering), then its marker; return its
    stats (count, bytes, sha256)."""
    t0 = time.perf_counter()
    group = int(np.searchsorted(np.asarray(offsets), index, side="right")) - 1
    fs, path = get_fs(plan_urls[group])
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, filters=[("shard", "=", index - int(offsets[group]))])
    rows = table.sort_by("position").to_pylist()
    name = shard_name(config.shard.prefix, first + index)
    samples: list[tuple[str, dict[str, bytes]]] = []
    rejected: Counter[str] = Counter()
    image_bytes = 0
    for row in rows:
        try:
            members, n = _sample(row, config, name, store.root)
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
        "part": index, "name": name, "group": group, "in": len(rows), "out": len(samples), "count": len(samples),
        "held": len(rows), "bytes": n_bytes, "image_bytes": image_bytes, "sha256": sha,
        "rejected": dict(sorted(rejected.items())), "labelled": sum(LABEL_KEY in m for _, m in samples),
        "seconds": round(time.perf_counter() - t0, 3),
    }  # fmt: skip
    store.mark_done("shard", index, stats, config_hash)
    return stats
