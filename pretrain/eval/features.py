"""Frozen-backbone features: batched extraction, the column layout of each mode, Parquet export and load.

Modes (``D`` = embed_dim, ``n`` = n_last_blocks; columns in this order):

- ``cls``: the normalised CLS token of the last block, ``model(x)`` (``D``).
- ``lastn``: CLS tokens of the last ``n`` blocks, earliest first (``n * D``).
- ``lastn_avgpool``: ``lastn`` then the mean of the last block's patch tokens (``(n + 1) * D``).
- ``avgpool``: the mean of the last block's patch tokens (``D``).

Intermediate outputs come from ``get_intermediate_layers(x, n, return_class_token=True)`` (final norm applied,
register tokens excluded from the patch mean), so the last-block CLS of every mode equals ``model(x)``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)

MODES = ("cls", "lastn", "lastn_avgpool", "avgpool")


@dataclass
class FeatureSet:
    """Features of one labelled split, in deterministic sample order."""

    features: torch.Tensor
    "``(N, F)`` float32."
    labels: torch.Tensor
    "``(N,)`` int64 class indices."
    keys: list[str]
    "Sample keys (``__key__``, ``class/file`` or the Parquet key / uri)."
    mode: str
    "Feature mode (see module docstring)."
    embed_dim: int
    "Backbone width ``D``."
    n_last_blocks: int = 1
    "Blocks whose CLS tokens are concatenated (``lastn`` modes)."
    classes: list[str] | None = None
    "Class names by index, or None for integer labels."

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.features.ndim != 2 or self.features.shape[0] != self.labels.shape[0] != len(self.keys):
            raise ValueError(f"features {tuple(self.features.shape)}, labels {tuple(self.labels.shape)} and "
                             f"{len(self.keys)} keys disagree")
        if self.features.shape[1] != feature_dim(self.mode, self.embed_dim, self.n_last_blocks):
            raise ValueError(f"{self.features.shape[1]} feature columns do not match mode {self.mode!r} with "
                             f"embed_dim {self.embed_dim} and n_last_blocks {self.n_last_blocks}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def cls_columns(self) -> slice:
        """Columns of the last block's CLS token (what k-NN uses)."""
        if self.mode == "avgpool":
            raise ValueError("features of mode 'avgpool' hold no CLS token; export with mode cls/lastn/lastn_avgpool")
        d = self.embed_dim
        return slice(0, d) if self.mode == "cls" else slice((self.n_last_blocks - 1) * d, self.n_last_blocks * d)


def feature_dim(mode: str, embed_dim: int, n_last_blocks: int) -> int:
    """Number of feature columns of a mode."""
    if mode in ("cls", "avgpool"):
        return embed_dim
    return (n_last_blocks + (mode == "lastn_avgpool")) * embed_dim


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device=auto or cpu")
    return torch.device(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def compute_features(model: nn.Module, images: torch.Tensor, mode: str, n_last_blocks: int = 1) -> torch.Tensor:
    """Features of one batch ``(B, 3, H, W)`` in ``mode`` (float32)."""
    if mode == "cls":
        return model(images).float()
    n = n_last_blocks if mode != "avgpool" else 1
    outputs = model.get_intermediate_layers(images, n, return_class_token=True)
    parts = [cls for _, cls in outputs] if mode in ("lastn", "lastn_avgpool") else []
    if mode in ("lastn_avgpool", "avgpool"):
        parts.append(outputs[-1][0].mean(dim=1))
    return torch.cat(parts, dim=-1).float()


def check_backbone(model: nn.Module, image_size: int, mode: str, n_last_blocks: int) -> None:
    """Raise ``ValueError`` when the eval size or block count does not fit the backbone."""
    patch = int(getattr(model, "patch_size", 1))
    if image_size % patch:
        raise ValueError(f"data.image_size {image_size} must be a multiple of the backbone patch size {patch}")
    blocks = getattr(model, "n_blocks", None)
    if mode in ("lastn", "lastn_avgpool") and blocks is not None and n_last_blocks > blocks:
        raise ValueError(f"n_last_blocks {n_last_blocks} exceeds the backbone's {blocks} blocks; lower it")


@torch.inference_mode()
def extract_features(model: nn.Module, loader: Iterable, *, mode: str = "cls", n_last_blocks: int = 1,
                     device: str | torch.device = "auto", precision: str = "auto",
                     classes: list[str] | None = None, desc: str = "features") -> FeatureSet:
    """Run a frozen backbone over a loader of ``(images, labels, order, keys)`` batches.

    The model runs in eval mode on ``device`` (it is moved there; its train/eval mode is restored afterwards);
    with ``precision`` ``auto`` the forward runs under bf16 autocast on CUDA and fp32 on CPU. Samples are
    returned sorted by their ``order`` (deterministic whatever the workers).
    """
    if mode not in MODES:
        raise ValueError(f"feature mode must be one of {MODES}, got {mode!r}")
    dev = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.eval().to(dev)
    try:
        return _extract(model, loader, mode, n_last_blocks, dev, precision, classes, desc)
    finally:
        model.train(was_training)


def _extract(model: nn.Module, loader: Iterable, mode: str, n_last_blocks: int, dev: torch.device, precision: str,
             classes: list[str] | None, desc: str) -> FeatureSet:
    feats, labels, orders, keys = [], [], [], []
    total = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
    with tqdm(total=total, desc=desc, unit="img", disable=None) as bar:
        for images, y, order, k in loader:
            with _autocast(dev, precision):
                f = compute_features(model, images.to(dev, non_blocking=True), mode, n_last_blocks)
            feats.append(f.cpu())
            labels.append(y)
            orders.append(order)
            keys.extend(k)
            bar.update(len(y))
    if not feats:
        raise ValueError(f"{desc}: the input yielded no samples")
    order = torch.argsort(torch.cat(orders), stable=True)
    features = torch.cat(feats)[order]
    if not torch.isfinite(features).all():
        raise ValueError(f"{desc}: the backbone produced non-finite features; check the weights and precision")
    embed_dim = features.shape[1] // max(1, feature_dim(mode, 1, n_last_blocks))
    return FeatureSet(features=features, labels=torch.cat(labels)[order], keys=[keys[i] for i in order.tolist()],
                      mode=mode, embed_dim=embed_dim, n_last_blocks=n_last_blocks if mode.startswith("lastn") else 1,
                      classes=classes)


_META_KEY = b"dinoforge.features"


def save_features(splits: dict[str, FeatureSet], path: str, *, extra: dict | None = None) -> None:
    """Write splits to one Parquet file: ``key``, ``label``, ``split``, ``feature`` (fixed_size_list<float32>).

    The layout (mode, embed_dim, n_last_blocks, classes) and ``extra`` go to the schema metadata. The file is
    written under a temporary name and moved into place, so a reader never sees a partial file.
    """
    if not splits:
        raise ValueError("save_features: no splits to write")
    first = next(iter(splits.values()))
    for name, fs_ in splits.items():
        if (fs_.mode, fs_.embed_dim, fs_.n_last_blocks) != (first.mode, first.embed_dim, first.n_last_blocks):
            raise ValueError(f"split {name!r} has a different feature layout than {next(iter(splits))!r}")
    dim = first.features.shape[1]
    tables = []
    for name, fs_ in splits.items():
        values = pa.array(fs_.features.numpy().astype(np.float32, copy=False).reshape(-1))
        tables.append(pa.table({
            "key": pa.array(fs_.keys, pa.string()),
            "label": pa.array(fs_.labels.numpy(), pa.int64()),
            "split": pa.array([name] * len(fs_), pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(values, dim),
        }))
    table = pa.concat_tables(tables)
    meta = {"mode": first.mode, "embed_dim": first.embed_dim, "n_last_blocks": first.n_last_blocks,
            "classes": first.classes, "splits": list(splits), **(extra or {})}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    fs, target = fsspec.core.url_to_fs(path)
    parent = target.rsplit("/", 1)[0] if "/" in target else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.mv(tmp, target)
    logger.info("wrote %d feature rows (%s, dim %d) to %s", table.num_rows, first.mode, dim, path)


def read_feature_metadata(path: str) -> dict:
    """The layout metadata ``save_features`` stored."""
    fs, target = fsspec.core.url_to_fs(path)
    if not fs.isfile(target):
        raise FileNotFoundError(f"feature file {path} does not exist; write it with 'eval features'")
    schema = pq.read_schema(target, filesystem=fs)
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a feature file written by 'eval features' (no layout metadata)")
    return json.loads(raw)


def load_features(path: str, split: str) -> FeatureSet:
    """Read one split of a feature file; rows of other splits are filtered out while reading."""
    meta = read_feature_metadata(path)
    if split not in meta["splits"]:
        raise ValueError(f"{path} has splits {meta['splits']}, not {split!r}")
    fs, target = fsspec.core.url_to_fs(path)
    table = pq.read_table(target, filesystem=fs, filters=pc.field("split") == split,
                          columns=["key", "label", "feature"])
    col = table.column("feature").combine_chunks()
    dim = col.type.list_size
    features = torch.from_numpy(col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).copy())
    return FeatureSet(features=features, labels=torch.from_numpy(table.column("label").to_numpy().copy()),
                      keys=table.column("key").to_pylist(), mode=meta["mode"], embed_dim=meta["embed_dim"],
                      n_last_blocks=meta["n_last_blocks"], classes=meta["classes"])
