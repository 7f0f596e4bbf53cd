"""Results of an eval run: JSON files in the output directory and plain-text tables."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import fsspec

from pretrain.utils.config import dump_toml

from .knn import KnnResult
from .linear import LinearResult

logger = logging.getLogger(__name__)


def write_json(data: dict[str, Any], output_dir: str, name: str) -> str:
    """Write ``output_dir/name`` atomically (temporary name, then move); returns the path."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    target = f"{root.rstrip('/')}/{name}"
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    fs.mv(tmp, target)
    logger.info("wrote %s", target)
    return target if "://" not in output_dir else f"{output_dir.rstrip('/')}/{name}"


def write_toml(data: dict[str, Any], output_dir: str, name: str) -> None:
    """Write a resolved config as TOML next to the results."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{name}", "w") as f:
        f.write(dump_toml(data))


def knn_table(result: KnnResult) -> str:
    """k | top-1 | top-5 table (percent)."""
    lines = [f"k-NN (T={result.temperature}, {result.n_train} train, {result.n_test} test, "
             f"{result.num_classes} classes)", f"{'k':>6} {'top-1':>8} {'top-5':>8}"]
    for k, ke, t1, t5 in zip(result.ks, result.k_effective, result.top1, result.top5):
        label = str(k) if k == ke else f"{k}->{ke}"
        lines.append(f"{label:>6} {100 * t1:>7.2f}% {100 * t5:>7.2f}%")
    return "\n".join(lines)


def linear_table(result: LinearResult) -> str:
    """Hold-out top-1 of every (feature set, lr), then the chosen head's single test result."""
    s = result.selection
    sets = list(dict.fromkeys(r["feature_set"] for r in s.grid))
    lrs = list(dict.fromkeys(r["lr"] for r in s.grid))
    acc = {(r["feature_set"], r["lr"]): r["holdout_top1"] for r in s.grid}
    width = max(len(n) for n in sets) + 2
    lines = [f"linear probe: hold-out top-1 (%) on {s.n_holdout} held-out TRAIN samples (fit on {s.n_fit})",
             f"{'lr':>10} " + " ".join(f"{n:>{width}}" for n in sets)]
    for lr in lrs:
        cells = [f"{100 * acc[(n, lr)]:>{width}.2f}" if (n, lr) in acc else " " * width for n in sets]
        lines.append(f"{lr:>10g} " + " ".join(cells))
    refit = "refit on all train" if result.refit else "trained on the fit part"
    lines.append(f"chosen: {s.feature_set}, lr {s.lr:g} ({refit}) -> test top-1 {100 * result.test_top1:.2f}%, "
                 f"top-5 {100 * result.test_top5:.2f}% on {result.n_test} samples")
    return "\n".join(lines)
