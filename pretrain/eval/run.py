"""Programmatic evaluation of a backbone: load it frozen, extract split features, k-NN / linear probe in one call."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from .config import BackboneConfig, DataConfig, ExtractConfig, KnnConfig, LinearConfig
from .datasets import make_loader, open_dataset
from .features import FeatureSet, check_backbone, extract_features
from .knn import KnnResult, knn_evaluate
from .linear import LinearResult, run_linear_probe
from .transforms import EvalTransform

logger = logging.getLogger(__name__)


def load_backbone(cfg: BackboneConfig) -> Any:
    """``build_backbone(name, weights, **overrides)`` frozen in eval mode (official or dinoforge weights)."""
    from pretrain.models import build_backbone

    model = build_backbone(cfg.name, weights=cfg.weights, **cfg.overrides)
    return model.eval().requires_grad_(False)


def extract_split(model: Any, data: DataConfig, extract: ExtractConfig, which: str, *, mode: str,
                  n_last_blocks: int = 1, classes: list[str] | None = None) -> FeatureSet:
    """Open ``data.train`` or ``data.test`` and compute its features (test reuses the train ``classes``)."""
    source = data.train if which == "train" else data.test
    split = data.train_split if which == "train" else data.test_split
    if source is None:
        raise ValueError(f"data.{which} is not set")
    check_backbone(model, data.image_size, mode, n_last_blocks)
    ds = open_dataset(source, transform=EvalTransform(data.image_size, data.resize_size), fmt=data.format,
                      split=split, classes=classes, limit=data.limit)
    loader = make_loader(ds, extract.batch_size, extract.num_workers)
    return extract_features(model, loader, mode=mode, n_last_blocks=n_last_blocks, device=extract.device,
                            precision=extract.precision, classes=ds.classes, desc=f"{which} features")


def knn_eval_model(model: nn.Module, data: DataConfig, extract: ExtractConfig | None = None,
                   knn: KnnConfig | None = None) -> KnnResult:
    """k-NN of a backbone already in memory (e.g. a teacher or student at the end of a run)."""
    extract = extract or ExtractConfig()
    train = extract_split(model, data, extract, "train", mode="cls")
    test = extract_split(model, data, extract, "test", mode="cls", classes=train.classes)
    return knn_evaluate(train, test, knn or KnnConfig(), device=extract.device)


def linear_eval_model(model: nn.Module, data: DataConfig, extract: ExtractConfig | None = None,
                      linear: LinearConfig | None = None) -> LinearResult:
    """Linear probe of a backbone in memory; the test split is extracted only after the selection is final."""
    extract, linear = extract or ExtractConfig(), linear or LinearConfig()
    n = linear.n_last_blocks
    train = extract_split(model, data, extract, "train", mode="lastn_avgpool", n_last_blocks=n)

    def load_test() -> FeatureSet:
        return extract_split(model, data, extract, "test", mode="lastn_avgpool", n_last_blocks=n,
                             classes=train.classes)

    return run_linear_probe(train, load_test, linear)
