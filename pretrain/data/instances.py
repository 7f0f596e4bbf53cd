"""A dense index of the training instances: one integer per sample of the shards, for memory-bank methods.

InstDisc and CMC keep one vector per training image. The loader yields each sample's shard-set index and
WebDataset key (the curation's content uid for dinoforge shards); :class:`InstanceIndex` maps ``(set, key)`` to
``0 .. n-1`` in a fixed order (sets in recipe order, keys sorted within a set), so every rank and every resume
agrees on the bank row of a sample without any communication.

Building it reads only the tar headers of every shard (``tarfile`` seeks over member data on local files).
``save``/``load`` keep the result in a text file (``<set>\\t<key>`` per line) so large runs scan once; the file
records the shard patterns it was made from and is rejected when they differ.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import fsspec
import torch
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from pretrain.data.wds import expand_shards

__all__ = ["InstanceIndex", "shard_keys"]

log = logging.getLogger(__name__)
_HEADER = "# dinoforge instance index v1"


def shard_keys(url: str) -> list[str]:
    """The sample keys of one tar shard in file order (a key once, however many members it has)."""
    keys: list[str] = []
    with fsspec.open(url, "rb") as f:
        mode = "r:" if f.seekable() else "r|"
        with tarfile.open(fileobj=f, mode=mode) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _ = base_plus_ext(member.name)
                if key is not None and (not keys or keys[-1] != key):
                    keys.append(key)
    return keys


class InstanceIndex:
    """``(set index, sample key) -> row`` for every sample of a run's shard sets."""

    def __init__(self, patterns: Sequence[str], keys: Sequence[Sequence[str]]) -> None:
        if len(patterns) != len(keys):
            raise ValueError(f"{len(patterns)} shard patterns but {len(keys)} key lists")
        self.patterns = [p.strip() for p in patterns]
        self._rows: list[dict[str, int]] = []
        offset = 0
        for set_keys in keys:
            unique = sorted(set(set_keys))
            self._rows.append({k: offset + i for i, k in enumerate(unique)})
            offset += len(unique)
        self._size = offset
        if self._size < 2:
            raise ValueError(f"an instance index needs at least 2 samples, the shards {self.patterns} hold "
                             f"{self._size}")

    def __len__(self) -> int:
        return self._size

    @classmethod
    def scan(cls, patterns: Sequence[str], *, progress: bool = False) -> InstanceIndex:
        """Read the keys of every shard of ``patterns`` (one shard set each)."""
        keys: list[list[str]] = []
        for pattern in patterns:
            urls = expand_shards(pattern)
            set_keys: list[str] = []
            for url in tqdm(urls, desc="instance index", unit="shard", disable=not progress):
                set_keys += shard_keys(url)
            keys.append(set_keys)
        index = cls(patterns, keys)
        log.info("instance index: %d samples in %d shard set(s)", len(index), len(patterns))
        return index

    @classmethod
    def build(cls, patterns: Sequence[str], cache: str | os.PathLike | None = None) -> InstanceIndex:
        """Load ``cache`` when it was made from ``patterns``, else scan the shards (and write ``cache`` if given)."""
        if cache is not None and Path(cache).exists():
            index = cls.load(cache)
            if index.patterns == [p.strip() for p in patterns]:
                return index
            log.warning("instance index %s was made from other shards (%s); rescanning", cache, index.patterns)
        index = cls.scan(patterns, progress=True)
        if cache is not None:
            index.save(cache)
        return index

    def rows(self, sets: torch.Tensor | Sequence[int], keys: Sequence[str]) -> torch.Tensor:
        """The rows (long tensor) of the samples ``keys`` of shard sets ``sets``; KeyError names an unknown one."""
        sets = [int(s) for s in sets]
        if len(sets) != len(keys):
            raise ValueError(f"{len(sets)} set indices for {len(keys)} keys")
        out = []
        for s, k in zip(sets, keys):
            try:
                out.append(self._rows[s][k])
            except (IndexError, KeyError):
                raise KeyError(f"sample {k!r} of shard set {s} is not in the instance index of {self.patterns} "
                               "(were shards added after the index was built?)") from None
        return torch.tensor(out, dtype=torch.long)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index atomically (several ranks may write the same file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [_HEADER, *(f"# set {i} {p}" for i, p in enumerate(self.patterns))]
        for s, rows in enumerate(self._rows):
            lines += [f"{s}\t{k}" for k in rows]  # insertion order = sorted
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> InstanceIndex:
        """Read a file written by :meth:`save`."""
        lines = Path(path).read_text().splitlines()
        if not lines or lines[0] != _HEADER:
            raise ValueError(f"{path} is not a dinoforge instance index")
        patterns = [line.split(" ", 3)[3] for line in lines[1:] if line.startswith("# set ")]
        keys: list[list[str]] = [[] for _ in patterns]
        for line in lines[1 + len(patterns):]:
            s, _, k = line.partition("\t")
            keys[int(s)].append(k)
        return cls(patterns, keys)
