"""Labelled image inputs for evaluation: WebDataset shards with ``cls``, image folders by class, Parquet label files.

Every input yields ``(image, label, order, key)`` where ``order`` is an integer that sorts samples into their
deterministic order (folder: class then file name; Parquet: row order; shards: shard order then position in the
shard), whatever the number of DataLoader workers. Labels are integers: class names (folders, string Parquet
labels) map to their index in the sorted class list of the TRAIN split, which the test split must reuse.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import braceexpand
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from webdataset import tariterators

from pretrain.utils.wds_sample import IMAGE_EXTENSIONS, LABEL_KEY, image_member

logger = logging.getLogger(__name__)

_SHARD_BITS = 32  # order = shard_index << 32 | position_in_shard

Transform = Callable[[Image.Image], Any]


def expand_shards(source: str) -> list[str]:
    """Expand brace patterns (``shards-{000000..000009}.tar``) and ``::``-separated lists into shard URLs."""
    urls: list[str] = []
    for part in source.split("::"):
        urls.extend(braceexpand.braceexpand(part))
    return urls


def _is_tar(path: str) -> bool:
    return path.endswith((".tar", ".tar.gz", ".tgz"))


def _list_dir(path: str) -> tuple[list[str], list[str]]:
    """(sub-directories, files) directly under ``path`` (fsspec), both sorted."""
    fs, root = fsspec.core.url_to_fs(path)
    dirs, files = [], []
    for entry in fs.ls(root, detail=True):
        name = entry["name"].rstrip("/")
        (dirs if entry["type"] == "directory" else files).append(name)
    return sorted(dirs), sorted(files)


def detect_format(source: str) -> str:
    """``wds``, ``parquet`` or ``folder`` for an input, by suffix or directory content."""
    first = expand_shards(source)[0]
    if _is_tar(first):
        return "wds"
    if first.endswith(".parquet"):
        return "parquet"
    fs, root = fsspec.core.url_to_fs(first)
    if not fs.isdir(root):
        raise ValueError(f"data input {source!r} is not a .tar shard pattern, a .parquet file or a directory")
    dirs, files = _list_dir(first)
    if dirs:
        return "folder"
    if any(_is_tar(f) for f in files):
        return "wds"
    raise ValueError(f"data input {source!r}: directory has neither class sub-folders nor .tar shards")


def _label_index(label: Any, classes: list[str] | None, where: str) -> int:
    """Integer label, mapping class names through ``classes``."""
    if isinstance(label, str):
        if classes is None:
            raise ValueError(f"{where}: label {label!r} is a class name but the train split has integer labels")
        try:
            return classes.index(label)
        except ValueError:
            raise ValueError(f"{where}: class {label!r} does not occur in the train split") from None
    if classes is not None:
        raise ValueError(f"{where}: integer label {label!r} but the train split has named classes")
    value = int(label)
    if value < 0:
        raise ValueError(f"{where}: labels must be >= 0, got {value}")
    return value


def read_image(uri: str) -> Image.Image:
    """Open an image from a local path or fsspec URL (fully loaded)."""
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    return decode_image(data, uri)


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"cannot decode image {where}: {exc}") from exc
    return img


class ImageRecords(Dataset):
    """Map-style dataset over ``(key, uri, label)`` records (image folders, Parquet label files)."""

    def __init__(self, records: Sequence[tuple[str, str, int]], transform: Transform | None,
                 classes: list[str] | None) -> None:
        self.records = list(records)
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Any, int, int, str]:
        key, uri, label = self.records[i]
        img = read_image(uri)
        return (self.transform(img) if self.transform else img), label, i, key


class EncodedImages(Dataset):
    """Map-style dataset over in-memory encoded samples ``(key, bytes, label, order, where)``."""

    def __init__(self, samples: Sequence[tuple[str, bytes, int, int, str]], transform: Transform | None,
                 classes: list[str] | None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int, int, str]:
        key, data, label, order, where = self.samples[i]
        img = decode_image(data, where)
        return (self.transform(img) if self.transform else img), label, order, key


def _iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples (dicts of extension -> bytes, ``__key__``) of one tar shard, read with webdataset's tar parser."""
    with fsspec.open(url, "rb") as stream:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
        yield from tariterators.group_by_keys(files)


def _wds_record(sample: dict[str, Any], url: str) -> tuple[str, bytes, int]:
    key = sample["__key__"]
    ext = image_member(sample)
    if ext is None:
        raise ValueError(f"sample {key!r} in {url} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
    if LABEL_KEY not in sample:
        raise ValueError(f"sample {key!r} in {url} has no '{LABEL_KEY}' label; "
                         f"eval shards need <key>.{LABEL_KEY} files")
    try:
        label = int(sample[LABEL_KEY].decode().strip())
    except ValueError:
        raise ValueError(f"sample {key!r} in {url}: {LABEL_KEY} must be an integer, "
                         f"got {sample[LABEL_KEY][:32]!r}") from None
    if label < 0:
        raise ValueError(f"sample {key!r} in {url}: labels must be >= 0, got {label}")
    return key, sample[ext], label


class ShardImages(IterableDataset):
    """WebDataset shards with ``cls``; DataLoader workers take every ``num_workers``-th shard."""

    classes: list[str] | None = None

    def __init__(self, urls: Sequence[str], transform: Transform | None) -> None:
        self.urls = list(urls)
        self.transform = transform

    def __iter__(self) -> Iterator[tuple[Any, int, int, str]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard_index in range(worker, len(self.urls), n_workers):
            url = self.urls[shard_index]
            for pos, sample in enumerate(_iter_shard(url)):
                key, data, label = _wds_record(sample, url)
                img = decode_image(data, f"{key} in {url}")
                yield (self.transform(img) if self.transform else img), label, (shard_index << _SHARD_BITS) | pos, key


def _first_shard_samples(urls: Sequence[str], limit: int) -> list[tuple[str, bytes, int, int, str]]:
    """The first ``limit`` samples of the shards in order, kept encoded in memory."""
    out = []
    for shard_index, url in enumerate(urls):
        for pos, sample in enumerate(_iter_shard(url)):
            key, data, label = _wds_record(sample, url)
            out.append((key, data, label, (shard_index << _SHARD_BITS) | pos, f"{key} in {url}"))
            if len(out) >= limit:
                return out
    return out


def _folder_records(root: str, classes: list[str] | None) -> tuple[list[tuple[str, str, int]], list[str]]:
    fs, base = fsspec.core.url_to_fs(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    dirs, _ = _list_dir(root)
    names = [posixpath.basename(d) for d in dirs]
    if not names:
        raise ValueError(f"image folder {root!r} has no class sub-folders (expected root/class_name/*.jpg)")
    own_classes = classes if classes is not None else names
    records = []
    for d, name in zip(dirs, names):
        label = _label_index(name, own_classes, f"image folder {root!r}")
        files = sorted(p for p in fs.find(d) if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
        for p in files:
            rel = posixpath.relpath(p, base.rstrip("/") or "/").rsplit(".", 1)[0]
            uri = p if protocol in ("file", "local") else f"{protocol}://{p}"
            records.append((rel, uri, label))
    if not records:
        raise ValueError(f"image folder {root!r} has no images ({'/'.join(IMAGE_EXTENSIONS)}) in its class folders")
    return records, own_classes


def _parquet_records(path: str, split: str | None,
                     classes: list[str] | None) -> tuple[list[tuple[str, str, int]], list[str] | None]:
    fs, local = fsspec.core.url_to_fs(path)
    table = pq.read_table(local, filesystem=fs)
    cols = set(table.column_names)
    uri_col = "uri" if "uri" in cols else "path" if "path" in cols else None
    if uri_col is None or "label" not in cols:
        raise ValueError(f"Parquet label file {path!r} needs 'uri' (or 'path') and 'label' columns, has {sorted(cols)}")
    if split is not None:
        if "split" not in cols:
            raise ValueError(f"Parquet label file {path!r} has no 'split' column; unset train_split/test_split")
        table = table.filter(pc.equal(table.column("split").cast(pa.string()), split))
        if table.num_rows == 0:
            raise ValueError(f"Parquet label file {path!r} has no rows with split == {split!r}")
    elif "split" in cols and len(set(table.column("split").to_pylist())) > 1:
        values = sorted(set(map(str, table.column("split").to_pylist())))
        raise ValueError(f"Parquet label file {path!r} mixes splits {values}; set data.train_split / data.test_split")
    uris = [str(u) for u in table.column(uri_col).to_pylist()]
    labels = table.column("label").to_pylist()
    key_col = next((c for c in ("key", "uid") if c in cols), None)
    keys = [str(k) for k in table.column(key_col).to_pylist()] if key_col else list(uris)
    base = posixpath.dirname(local)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if classes is None and labels and isinstance(labels[0], str):
        classes = sorted(set(labels))
    records = []
    for key, uri, label in zip(keys, uris, labels):
        if "://" not in uri and not posixpath.isabs(uri):
            uri = posixpath.join(base, uri)
            if protocol not in ("file", "local"):
                uri = f"{protocol}://{uri}"
        records.append((key, uri, _label_index(label, classes, f"Parquet label file {path!r}")))
    return records, classes


LabeledImages = ImageRecords | EncodedImages | ShardImages


def open_dataset(source: str, *, transform: Transform | None, fmt: str = "auto", split: str | None = None,
                 classes: list[str] | None = None, limit: int | None = None) -> LabeledImages:
    """Open one labelled split.

    Args:
        source: shard pattern / list (``a-{0..9}.tar``, ``::``-separated, fsspec URLs), an image folder
            ``root/class_name/*.jpg`` or a Parquet label file (``uri``/``path`` + ``label``, optional ``split`` and
            ``key``/``uid``; relative paths are resolved against the file's directory).
        transform: applied to each PIL image (``None`` yields the PIL image).
        fmt: ``auto``, ``wds``, ``folder`` or ``parquet``.
        split: Parquet only: keep rows with this ``split`` value.
        classes: class names of the train split; pass ``train.classes`` when opening the test split.
        limit: keep only ``limit`` samples: the first ones of shards and Parquet files; for image folders (sorted
            by class) the first files of every class in turn, so a small limit still covers all classes.

    The returned dataset has ``classes`` (sorted class names, or ``None`` for integer labels).
    """
    kind = detect_format(source) if fmt == "auto" else fmt
    if kind not in ("wds", "folder", "parquet"):
        raise ValueError(f"data.format must be auto, wds, folder or parquet, got {fmt!r}")
    if split is not None and kind != "parquet":
        raise ValueError(f"data input {source!r} is {kind}; a split name only applies to Parquet label files")
    if kind == "wds":
        if classes is not None:
            raise ValueError(f"shards {source!r} carry integer cls labels but the train split has named classes")
        urls = expand_shards(source)
        if len(urls) == 1 and not _is_tar(urls[0]):  # a directory of shards
            urls = [u for u in _list_dir(urls[0])[1] if _is_tar(u)]
            fs, _ = fsspec.core.url_to_fs(source)
            protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
            if protocol not in ("file", "local"):
                urls = [f"{protocol}://{u}" for u in urls]
        if limit is not None:
            return EncodedImages(_first_shard_samples(urls, limit), transform, None)
        return ShardImages(urls, transform)
    if kind == "folder":
        records, own = _folder_records(source, classes)
    else:
        records, own = _parquet_records(source, split, classes)
    if limit is not None:
        records = _interleaved_head(records, limit) if kind == "folder" else records[:limit]
    return ImageRecords(records, transform, own)


def _interleaved_head(records: list[tuple[str, str, int]], limit: int) -> list[tuple[str, str, int]]:
    """``limit`` records taken class by class in turn (i-th file of every class before the (i+1)-th), kept in
    their original order."""
    rank: dict[int, int] = {}
    keyed = []
    for i, rec in enumerate(records):
        r = rank.get(rec[2], 0)
        rank[rec[2]] = r + 1
        keyed.append((r, rec[2], i))
    chosen = sorted(i for _, _, i in sorted(keyed)[:limit])
    return [records[i] for i in chosen]


def _collate(batch: list[tuple[Any, int, int, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    images, labels, order, keys = zip(*batch)
    return (torch.stack(images), torch.tensor(labels, dtype=torch.int64), torch.tensor(order, dtype=torch.int64),
            list(keys))


def make_loader(dataset: LabeledImages, batch_size: int, num_workers: int) -> DataLoader:
    """Batches ``(images, labels, order, keys)`` in a fixed order (no shuffling)."""
    if isinstance(dataset, ShardImages) and num_workers > len(dataset.urls):
        num_workers = len(dataset.urls)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=_collate, persistent_workers=False)
