"""Fashion-MNIST (idx files) as labelled eval inputs: WebDataset shards with ``cls``, image folders, Parquet labels.

Used by tests and the CPU demo, where no data set can be downloaded. The idx files are the standard
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` from the Fashion-MNIST release.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str) -> np.ndarray:
    """An idx array (``.gz`` or raw): magic ``0 0 dtype ndim``, big-endian int32 dims, then the data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims.tolist()} but holds {data.size} values")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "train", limit: int | None = None, *, root: str = DEFAULT_ROOT,
                       balanced: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))``; with ``limit`` and ``balanced``, equal counts per class
    (the first images of each class in file order, interleaved)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_file, lbl_file = _FILES[split]
    images = read_idx(os.path.join(root, img_file))
    labels = read_idx(os.path.join(root, lbl_file)).astype(np.int64)
    if limit is None:
        return images, labels
    if not balanced:
        return images[:limit], labels[:limit]
    per_class = -(-limit // len(CLASSES))
    picks = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]
    order = np.stack(picks, axis=1).reshape(-1)[:limit]  # interleave classes: c0, c1, ..., c9, c0, ...
    return images[order], labels[order]


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(images: np.ndarray, labels: np.ndarray, pattern: str, *, maxcount: int = 1000,
                 keys: Sequence[str] | None = None) -> list[str]:
    """WebDataset shards (``<key>.png`` + ``<key>.cls``) with ``webdataset.ShardWriter``; returns the shard paths.

    ``pattern`` is a local printf pattern such as ``/data/fmnist-train-%06d.tar``.
    """
    keys = keys if keys is not None else [f"{i:06d}" for i in range(len(images))]
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for key, img, label in zip(keys, images, labels):
            sink.write({"__key__": key, "png": _png(img), "cls": str(int(label)).encode()})
        written = [pattern % i for i in range(sink.shard)]
    return written


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: str, *,
                       keys: Sequence[str] | None = None) -> None:
    """``root/<class_name>/<key>.png`` with class names from ``CLASSES`` (sorted order == label order)."""
    keys = keys if keys is not None else [f"{i:06d}" for i in range(len(images))]
    for key, img, label in zip(keys, images, labels):
        folder = os.path.join(root, f"{int(label)}-{CLASSES[int(label)]}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"{key}.png"))


def write_parquet_labels(paths: Sequence[str], labels: Sequence[int] | Sequence[str], out: str, *,
                         splits: Sequence[str] | None = None, keys: Sequence[str] | None = None) -> None:
    """A Parquet label file: ``uri``, ``label`` (class index or name) and optional ``split`` / ``key`` columns."""
    values = [x if isinstance(x, str) else int(x) for x in labels]
    label_type = pa.string() if values and isinstance(values[0], str) else pa.int64()
    cols = {"uri": pa.array(list(paths), pa.string()), "label": pa.array(values, label_type)}
    if splits is not None:
        cols["split"] = pa.array(list(splits), pa.string())
    if keys is not None:
        cols["key"] = pa.array(list(keys), pa.string())
    pq.write_table(pa.table(cols), out)
