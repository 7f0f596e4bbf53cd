"""Multi-crop pretraining batches from WebDataset shards, with an exact, checkpointable data position.

``WdsLoader`` wraps a torch ``DataLoader`` over an ``IterableDataset``. Each of the K workers of a rank owns
one deterministic stream (see :mod:`pretrain.data.wds`) and builds whole batches: decode (JPEG draft mode),
multi-crop augmentation, collate with masks. The DataLoader hands batches out round-robin, so the rank's batch
``b`` comes from worker ``b % K``; every batch carries the index ``b`` and its worker's stream position, and the
loader keeps the position of the last batch *consumed* per worker. ``state_dict()`` is therefore the exact
data position of the training loop, and a loader built from it yields exactly the batches an uninterrupted
one would have yielded next.

Randomness: the augmentation of a sample is seeded by (seed, global sample index) with
``index = (b * world_size + rank) * batch_size + position in batch``, the masks of a batch by (seed, rank, b).
Undecodable images and samples without an image are skipped and counted (``metrics()``), never fatal.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.augment import MultiCropAugment, MultiCropConfig, decode_for_crops
from pretrain.data.collate import MaskFn, collate_multicrop
from pretrain.data.masking import MaskingConfig
from pretrain.data.wds import MixedStream, WdsConfig, expand_shards
from pretrain.utils.wds_sample import image_member

__all__ = ["COUNTERS", "MultiCropWebDataset", "WdsLoader"]

log = logging.getLogger(__name__)
#: Skip counters reported by ``WdsLoader.metrics()``.
COUNTERS = ("corrupt_image", "missing_image", "missing_label", "corrupt_shards")
_STATE_VERSION = 1


def _empty_counters() -> dict[str, int]:
    return {k: 0 for k in COUNTERS}


class MultiCropWebDataset(IterableDataset):
    """Infinite batches of one rank; ``resume`` (set by ``WdsLoader``) says where each worker starts."""

    def __init__(self, cfg: WdsConfig, crops: MultiCropConfig, *, patch_size: int, rank: int, world_size: int,
                 masking: MaskingConfig | None = None, mask_fn: MaskFn | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg, self.crops, self.patch_size = cfg, crops, patch_size
        self.rank, self.world_size = rank, world_size
        self.masking, self.mask_fn, self.dtype = masking, mask_fn, dtype
        self.shard_sets = [expand_shards(u) for u in cfg.urls]
        self.n_workers = max(1, cfg.num_workers)
        self.resume: dict[str, Any] = {"base_batch": 0, "reseed": 0, "offset": 0, "workers": [None] * self.n_workers}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        proc = info.id if info is not None else 0
        if info is not None and info.num_workers != self.n_workers:
            raise RuntimeError(f"dataset built for {self.n_workers} workers runs in {info.num_workers}")
        worker = (proc + self.resume["offset"]) % self.n_workers
        return self._batches(worker, self.resume["workers"][worker])

    def _batches(self, worker: int, state: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        cfg, k_total = self.cfg, self.n_workers
        state = state or {"batches": 0, "stream": None, "counters": _empty_counters()}
        counters = dict(state["counters"])
        made, base, reseed = int(state["batches"]), int(self.resume["base_batch"]), int(self.resume["reseed"])
        stream = MixedStream(self.shard_sets, cfg.set_weights, stream_id=self.rank * k_total + worker,
                             n_streams=self.world_size * k_total, seed=cfg.seed, reseed=reseed,
                             shards_per_window=cfg.shards_per_window, shuffle_buffer=cfg.shuffle_buffer,
                             max_empty_shards=cfg.max_empty_shards, state=state["stream"])
        augments: dict[tuple[int, int], MultiCropAugment] = {}
        min_side = self.crops.min_decode_side
        image_keys, label_key = cfg.image_keys, cfg.label_key
        samples_it = iter(stream)
        while True:
            b = base + made * k_total + worker
            crops = self.crops.for_batch(np.random.default_rng([cfg.seed, 6, b]))  # mixed resolutions: per batch
            key = (crops.global_size, crops.local_size)
            if key not in augments:
                augments[key] = MultiCropAugment(crops)
            augment = augments[key]
            samples: list[dict[str, Any]] = []
            while len(samples) < cfg.batch_size:
                set_index, raw = next(samples_it)
                member = image_member(raw, image_keys)
                data = None if member is None else raw[member]
                if data is None:
                    counters["missing_image"] += 1
                    log.debug("sample %s of %s has none of the fields %s", raw["__key__"], raw["__url__"], image_keys)
                    continue
                try:
                    img = decode_for_crops(data, min_side)
                except Exception as exc:  # any decoder failure: count and skip the sample
                    counters["corrupt_image"] += 1
                    log.debug("cannot decode %s of %s: %s", raw["__key__"], raw["__url__"], exc)
                    continue
                index = (b * self.world_size + self.rank) * cfg.batch_size + len(samples)
                sample = augment(img, np.random.default_rng([cfg.seed, 1, index]))
                sample["key"], sample["url"], sample["set"] = raw["__key__"], raw["__url__"], set_index
                if label_key is not None:
                    sample["label"] = self._label(raw, label_key, counters)
                samples.append(sample)
            batch = collate_multicrop(samples, patch_size=self.patch_size, masking=self.masking,
                                      mask_fn=self.mask_fn, dtype=self.dtype,
                                      generator=np.random.default_rng([cfg.seed, 2, self.rank, b]))
            batch["urls"] = [s["url"] for s in samples]
            batch["sets"] = torch.tensor([s["set"] for s in samples], dtype=torch.long)
            batch["batch_index"] = b
            made += 1
            stream_state = stream.state_dict()
            counters["corrupt_shards"] = stream_state["corrupt_shards"]
            batch["_state"] = {"worker": worker, "batches": made, "stream": stream_state, "counters": dict(counters)}
            yield batch

    @staticmethod
    def _label(raw: dict[str, Any], key: str, counters: dict[str, int]) -> int:
        try:
            value = raw[key]
            return int(value.decode() if isinstance(value, bytes) else value)
        except (KeyError, ValueError, UnicodeDecodeError):
            counters["missing_label"] += 1
            return -1


class WdsLoader:
    """Iterable of training batches (see :func:`pretrain.data.collate.collate_multicrop` for the keys, plus
    ``urls``, ``sets`` and ``batch_index``) with ``state_dict()`` / ``load_state_dict()`` for exact resume.

    Iterating again after a break continues where the last consumed batch left off (new worker processes).
    """

    def __init__(self, cfg: WdsConfig, crops: MultiCropConfig, *, patch_size: int, rank: int | None = None,
                 world_size: int | None = None, masking: MaskingConfig | None = None,
                 mask_fn: MaskFn | None = None, dtype: torch.dtype = torch.float32) -> None:
        if rank is None or world_size is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if initialised else 0) if rank is None else rank
            world_size = (dist.get_world_size() if initialised else 1) if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.cfg = cfg
        self.dataset = MultiCropWebDataset(cfg, crops, patch_size=patch_size, rank=rank, world_size=world_size,
                                           masking=masking, mask_fn=mask_fn, dtype=dtype)
        self.rank, self.world_size, self.n_workers = rank, world_size, self.dataset.n_workers
        self._consumed = 0
        self._base_batch, self._reseed = 0, 0
        self._workers: list[dict[str, Any] | None] = [None] * self.n_workers
        self._counters_base = _empty_counters()

    def _fingerprint(self) -> str:
        cfg = self.cfg
        text = json.dumps([cfg.urls, cfg.weights, [len(s) for s in self.dataset.shard_sets], cfg.shuffle_buffer,
                           cfg.shards_per_window, cfg.image_key])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = copy.copy(self.dataset)
        ds.resume = {"base_batch": self._base_batch, "reseed": self._reseed,
                     "offset": (self._consumed - self._base_batch) % self.n_workers,
                     "workers": copy.deepcopy(self._workers)}
        cfg = self.cfg
        extra = {"prefetch_factor": cfg.prefetch_factor} if cfg.num_workers > 0 else {}
        # a private generator for the workers' base seed keeps the global torch RNG untouched (nothing here uses it)
        loader = DataLoader(ds, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                            generator=torch.Generator().manual_seed(cfg.seed), **extra)
        for batch in loader:
            state = batch.pop("_state")
            if batch["batch_index"] != self._consumed:  # the DataLoader broke its round-robin order
                raise RuntimeError(f"expected batch {self._consumed}, got {batch['batch_index']}")
            self._workers[state["worker"]] = state
            self._consumed += 1
            yield batch

    @property
    def batches_consumed(self) -> int:
        """Batches this rank has handed out so far (including before a resume)."""
        return self._consumed

    def metrics(self) -> dict[str, int]:
        """Skip counters (``COUNTERS``) of this rank, plus ``batches`` and ``samples`` handed out."""
        out = dict(self._counters_base)
        for state in self._workers:
            if state is not None:
                for k in COUNTERS:
                    out[k] += state["counters"][k]
        out["batches"] = self._consumed
        out["samples"] = self._consumed * self.cfg.batch_size
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable data position of this rank (save one per rank, e.g. in the checkpoint)."""
        cfg = self.cfg
        return {
            "version": _STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self.n_workers, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "fingerprint": self._fingerprint(), "batches": self._consumed, "base_batch": self._base_batch,
            "reseed": self._reseed, "workers": copy.deepcopy(self._workers),
            "counters_base": dict(self._counters_base),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore a position. ``strict`` requires the same rank, world size, workers, batch size, seed and
        shards (exact resume); ``strict=False`` accepts another layout and starts fresh streams (reseeded by
        the step) while keeping the batch count, so sample and mask seeds continue and no stream repeats."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {_STATE_VERSION}")
        mine = self.state_dict()
        fields = ("rank", "world_size", "num_workers", "batch_size", "seed", "fingerprint")
        diff = [f"{k}: saved {state[k]!r}, now {mine[k]!r}" for k in fields if state[k] != mine[k]]
        counters = dict(state["counters_base"])
        self._consumed = int(state["batches"])
        if not diff:
            self._base_batch, self._reseed = int(state["base_batch"]), int(state["reseed"])
            self._workers = copy.deepcopy(state["workers"])
            self._counters_base = counters
            return
        if strict:
            raise ValueError("data state does not match this loader (pass strict=False to resume approximately): "
                             + "; ".join(diff))
        log.warning("data position is approximate after a layout change (%s); streams restart reseeded",
                    "; ".join(diff))
        for worker in state["workers"]:
            if worker is not None:
                for k in COUNTERS:
                    counters[k] += worker["counters"][k]
        self.restart_at(self._consumed)
        self._counters_base = counters

    def restart_at(self, batches: int) -> None:
        """Approximate position without a matching state (e.g. after a world-size change): fresh streams,
        reseeded by ``batches``, with batch indices (hence sample and mask seeds) continuing from ``batches``."""
        if batches < 0:
            raise ValueError(f"batches must be >= 0, got {batches}")
        self._consumed = self._base_batch = int(batches)
        self._reseed = self._consumed + 1
        self._workers = [None] * self.n_workers
        self._counters_base = _empty_counters()
