"""Deterministic, resumable WebDataset sample streams over fsspec shard URLs.

A *stream* is one (rank, loader worker) pair: ``stream_id = rank * K + worker`` out of ``n_streams = world * K``.

Shard order. For each shard set, the global shard sequence is the concatenation of per-epoch permutations
(``perm_e`` seeded by (seed, set, epoch)); stream ``s`` reads slots ``s, s + n, s + 2n, ...`` of it. So every
pass over the data visits each shard once across all streams, reshuffled every epoch, and a stream never runs
dry even with fewer shards than streams.

Sample order. A stream reads its slots in *windows* of ``shards_per_window`` shards, interleaved at random,
through a shuffle buffer that is drained at the window's end. The window's output is a pure function of
(seed, set, stream, window) and the shard bytes, so the position ``(window, offset)`` is an exact, compact
resume point: resuming re-reads (without decoding) at most one window. Several shard sets are mixed by
per-sample draws with the given weights, from counter-based generators (no replay needed).

Shards are read with ``webdataset``'s tar iterator and key grouping over ``fsspec.open`` streams, so anything
``webdataset.ShardWriter`` writes reads back the same. An unreadable or truncated shard ends early and is counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pretrain.utils.wds_sample import IMAGE_EXTENSIONS

__all__ = ["MixedStream", "SetStream", "WdsConfig", "expand_shards", "read_shard"]

log = logging.getLogger(__name__)
_CHOICE_BLOCK = 1024


@dataclass(kw_only=True)
class WdsConfig:
    """WebDataset loading for pretraining (per rank)."""

    urls: list[str]
    """Shard sets, one fsspec URL pattern each (local, s3://, gs://, http://; brace ranges {000000..000099};
    several patterns of one set joined by '::')."""
    weights: list[float] | None = None
    """Sampling weight of each shard set (None = equal)."""
    batch_size: int = 64
    """Samples per batch on each rank."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 1000
    """Samples held in each stream's shuffle buffer (0 or 1 = no buffer)."""
    shards_per_window: int = 4
    """Shards a stream reads at once, interleaved at random; the resume replay reads at most this many."""
    seed: int = 0
    """Seed of shard orders, shuffles, augmentations and masks."""
    image_key: str = ";".join(IMAGE_EXTENSIONS)
    """Sample fields to take the image from, first present wins (';'-separated, lower case); default: the image
    extensions of the sample contract (:mod:`pretrain.utils.wds_sample`), ``jpg;jpeg;png;webp``."""
    label_key: str | None = None
    """Sample field holding an integer label (e.g. "cls"); None = no labels."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = False
    """Pin batch memory (for CUDA training)."""
    max_empty_shards: int = 0
    """Consecutive shards without a sample before a stream gives up; 0 = 20 x shards in the set + 100."""

    def __post_init__(self) -> None:
        if not self.urls or not all(isinstance(u, str) and u.strip() for u in self.urls):
            raise ValueError(f"urls must be a non-empty list of shard URL patterns, got {self.urls!r}")
        if self.weights is not None:
            if len(self.weights) != len(self.urls):
                raise ValueError(f"weights has {len(self.weights)} values for {len(self.urls)} urls")
            if any(w <= 0 for w in self.weights):
                raise ValueError(f"weights must all be > 0, got {self.weights}")
        for name, lo in (("batch_size", 1), ("num_workers", 0), ("shuffle_buffer", 0), ("shards_per_window", 1),
                         ("seed", 0), ("prefetch_factor", 1), ("max_empty_shards", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if not self.image_keys:
            raise ValueError(f"image_key must name at least one field, got {self.image_key!r}")

    @property
    def image_keys(self) -> list[str]:
        """The image field names in priority order."""
        return [k.strip().lower() for k in self.image_key.split(";") if k.strip()]

    @property
    def set_weights(self) -> np.ndarray:
        """Normalised shard-set weights."""
        w = np.asarray(self.weights if self.weights is not None else [1.0] * len(self.urls), dtype=np.float64)
        return w / w.sum()


def expand_shards(pattern: str) -> list[str]:
    """Expand a shard pattern (brace ranges, '::' lists) and check local shards exist (ValueError if not)."""
    urls = [u for u in expand_urls(pattern.strip()) if u]
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no URLs")
    local = [u[len("file://"):] if u.startswith("file://") else u for u in urls if "://" not in u or
             u.startswith("file://")]
    missing = [u for u in local if not os.path.exists(u)]
    if missing:
        raise ValueError(f"shard pattern {pattern!r}: {len(missing)} of {len(urls)} local shards do not exist, "
                         f"e.g. {missing[:3]}")
    return urls


def read_shard(url: str, on_error: Any = None) -> Iterator[dict[str, Any]]:
    """Samples (``{"__key__", "__url__", ext: bytes, ...}``) of one tar shard; errors end the shard early.

    ``on_error(url, exc)`` is called once when the shard cannot be opened or is corrupt part-way.
    """
    try:
        with fsspec.open(url, "rb") as f:
            files = ({**x, "__url__": url} for x in tar_file_iterator(f))
            yield from group_by_keys(files)
    except Exception as exc:  # unreadable, truncated or not a tar: skip the rest of the shard
        if on_error is not None:
            on_error(url, exc)


class SetStream:
    """One stream's infinite, windowed, shuffled samples of one shard set; ``window``/``offset`` is its state."""

    def __init__(self, shards: list[str], *, set_index: int, stream_id: int, n_streams: int, seed: int,
                 reseed: int, shards_per_window: int, shuffle_buffer: int, max_empty_shards: int = 0,
                 window: int = 0, offset: int = 0) -> None:
        self.shards, self.set_index = shards, set_index
        self.stream_id, self.n_streams = stream_id, n_streams
        self.seed, self.reseed = seed, reseed
        self.m, self.buffer = shards_per_window, shuffle_buffer
        self.max_empty = max_empty_shards or 20 * len(shards) + 100
        self.window, self.offset = window, offset
        self.corrupt_shards = 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        self._replaying = False
        self._last_error: str | None = None

    def shard_for_slot(self, slot: int) -> str:
        """URL of this stream's ``slot``-th shard (global position ``stream_id + slot * n_streams``)."""
        epoch, index = divmod(self.stream_id + slot * self.n_streams, len(self.shards))
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, 4, self.reseed, self.set_index, epoch])
            self._perm_epoch, self._perm = epoch, rng.permutation(len(self.shards))
        return self.shards[int(self._perm[index])]

    def _on_error(self, url: str, exc: Exception) -> None:
        self._last_error = f"{url}: {type(exc).__name__}: {exc}"
        if not self._replaying:
            self.corrupt_shards += 1
            log.warning("skipping the rest of shard %s (%s: %s)", url, type(exc).__name__, exc)

    def window_samples(self, window: int) -> Iterator[dict[str, Any]]:
        """The deterministic sample sequence of one window (its shards interleaved, then shuffle-buffered)."""
        rng = np.random.default_rng([self.seed, 5, self.reseed, self.set_index, self.stream_id, window])
        urls = [self.shard_for_slot(j) for j in range(window * self.m, (window + 1) * self.m)]
        iters = [read_shard(u, self._on_error) for u in urls]
        active, buf = list(range(len(iters))), []
        while active:
            pos = int(rng.integers(len(active)))
            sample = next(iters[active[pos]], None)
            if sample is None:
                active.pop(pos)
                continue
            if self.buffer <= 1:
                yield sample
                continue
            buf.append(sample)
            if len(buf) >= self.buffer:
                k = int(rng.integers(len(buf)))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        while buf:
            k = int(rng.integers(len(buf)))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        empty_shards = 0
        while True:
            skip, produced = self.offset, 0
            self._replaying = skip > 0
            for sample in self.window_samples(self.window):
                produced += 1
                if produced <= skip:
                    continue
                self._replaying = False
                self.offset = produced
                yield sample
            self._replaying = False
            empty_shards = 0 if produced else empty_shards + self.m
            if empty_shards >= self.max_empty:
                raise ValueError(f"shard set {self.set_index}: {empty_shards} consecutive shards gave no samples "
                                 f"(last error: {self._last_error}); check the URLs and that they are WebDataset "
                                 f"tar shards")
            self.window, self.offset = self.window + 1, 0


class MixedStream:
    """One stream over all shard sets: each sample's set drawn with the weights; yields ``(set_index, sample)``."""

    def __init__(self, shard_sets: list[list[str]], weights: np.ndarray, *, stream_id: int, n_streams: int,
                 seed: int, reseed: int, shards_per_window: int, shuffle_buffer: int, max_empty_shards: int = 0,
                 state: dict[str, Any] | None = None) -> None:
        state = state or {}
        positions = state.get("sets", [[0, 0]] * len(shard_sets))
        if len(positions) != len(shard_sets):
            raise ValueError(f"stream state has {len(positions)} shard sets, the config {len(shard_sets)}")
        self.sets = [
            SetStream(shards, set_index=i, stream_id=stream_id, n_streams=n_streams, seed=seed, reseed=reseed,
                      shards_per_window=shards_per_window, shuffle_buffer=shuffle_buffer,
                      max_empty_shards=max_empty_shards, window=int(w), offset=int(o))
            for i, (shards, (w, o)) in enumerate(zip(shard_sets, positions))
        ]
        self.weights = weights
        self.stream_id, self.seed, self.reseed = stream_id, seed, reseed
        self.t = int(state.get("t", 0))
        self._corrupt_base = int(state.get("corrupt_shards", 0))
        self._block, self._choices = -1, np.empty(0, dtype=np.int64)

    def _choice(self, t: int) -> int:
        if len(self.sets) == 1:
            return 0
        block = t // _CHOICE_BLOCK
        if block != self._block:
            rng = np.random.default_rng([self.seed, 3, self.reseed, self.stream_id, block])
            self._block, self._choices = block, rng.choice(len(self.sets), size=_CHOICE_BLOCK, p=self.weights)
        return int(self._choices[t % _CHOICE_BLOCK])

    def state_dict(self) -> dict[str, Any]:
        """Position after the last yielded sample: ``{"t", "sets": [[window, offset], ...], "corrupt_shards"}``."""
        return {"t": self.t, "sets": [[s.window, s.offset] for s in self.sets],
                "corrupt_shards": self._corrupt_base + sum(s.corrupt_shards for s in self.sets)}

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        iters = [iter(s) for s in self.sets]
        while True:
            i = self._choice(self.t)
            sample = next(iters[i])
            self.t += 1
            yield i, sample
