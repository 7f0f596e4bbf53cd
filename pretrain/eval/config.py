"""Configs of the evaluation suite: backbone, inputs, feature extraction, k-NN and linear probe.

Every config is a ``@dataclass(kw_only=True)`` validated in ``__post_init__``; the CLI builds them with
``pretrain.utils.config`` from an optional TOML file, its flags and dotted ``section.field=value`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: DINOv2's linear-probe learning-rate grid (each multiplied by batch_size / 256 when ``scale_lr_by_batch``).
DEFAULT_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)

DataFormat = Literal["auto", "wds", "folder", "parquet"]
FeatureMode = Literal["cls", "lastn", "lastn_avgpool", "avgpool"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(kw_only=True)
class BackboneConfig:
    """Which backbone to evaluate (anything ``pretrain.models.build_backbone`` builds)."""

    name: str | None = None
    "Architecture (``vits14``, ``vitg14_reg4``, ``vit_test``, ...); None reads it from the ``<weights>.json`` sidecar."
    weights: str | None = None
    "Official DINOv2 checkpoint or dinoforge export (local path or fsspec URL); None keeps the random init."
    overrides: dict[str, Any] = field(default_factory=dict)
    "``ViTConfig`` field overrides passed to ``build_backbone`` (e.g. ``{patch_size = 7}``)."

    def __post_init__(self) -> None:
        if self.name is None and self.weights is None:
            raise ValueError("backbone.name: give an architecture name, or backbone.weights with a .json sidecar")


@dataclass(kw_only=True)
class DataConfig:
    """Labelled train / test inputs and the eval transform."""

    train: str | None = None
    "Train split: WebDataset shards (``.tar``, brace patterns, fsspec URLs), an image folder or a Parquet label file."
    test: str | None = None
    "The split that is reported; same kinds of input as ``train``."
    format: DataFormat = "auto"
    "Input kind for both splits: ``auto`` (by suffix / folder content), ``wds``, ``folder`` or ``parquet``."
    train_split: str | None = None
    "Parquet inputs only: keep rows whose ``split`` column equals this value for the train split."
    test_split: str | None = None
    "Parquet inputs only: keep rows whose ``split`` column equals this value for the test split."
    image_size: int = 224
    "Centre-crop side in pixels; must be a multiple of the backbone's patch size."
    resize_size: int | None = None
    "Short side before the centre crop; None uses ``round(image_size * 256 / 224)``."
    limit: int | None = None
    "At most this many samples per split (shards/Parquet: the first ones; folders: round-robin over classes)."

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {self.image_size}")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise ValueError(f"resize_size {self.resize_size} must be >= image_size {self.image_size}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be > 0 or unset, got {self.limit}")
        if self.format != "parquet" and self.format != "auto" and (self.train_split or self.test_split):
            raise ValueError("train_split/test_split select rows of a Parquet label file; set format to parquet/auto")


@dataclass(kw_only=True)
class ExtractConfig:
    """How features are computed from a frozen backbone."""

    batch_size: int = 64
    "Images per forward pass."
    num_workers: int = 2
    "DataLoader worker processes that decode and transform images (0 = in the main process)."
    device: str = "auto"
    "``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."
    precision: Precision = "auto"
    "Autocast dtype of the backbone: ``auto`` is bf16 on CUDA and fp32 on CPU; features are always stored fp32."

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(kw_only=True)
class KnnConfig:
    """Weighted k-NN classification on L2-normalised CLS features (DINO protocol)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    "Neighbour counts to report (each capped at the train-set size)."
    temperature: float = 0.07
    "Vote weight of a neighbour is exp(cosine / temperature)."
    chunk_size: int = 256
    "Test queries per similarity block (memory: chunk_size x n_train floats)."

    def __post_init__(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of positive integers, got {self.ks}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {self.chunk_size}")


@dataclass(kw_only=True)
class LinearConfig:
    """Linear probe on frozen features: a grid of heads trained in parallel, chosen on a train hold-out."""

    learning_rates: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    "Base learning rates of the grid."
    scale_lr_by_batch: bool = True
    "Multiply every learning rate by ``batch_size / 256``."
    n_last_blocks: int = 4
    "CLS tokens of this many last blocks form the multi-block feature sets (1 gives only the last-block sets)."
    feature_sets: list[str] = field(default_factory=list)
    "Restrict the grid to these feature sets (e.g. ``last1_cls``); empty uses every set the features allow."
    epochs: int = 10
    "Passes over the training features."
    batch_size: int = 256
    "Feature vectors per SGD step."
    momentum: float = 0.9
    "SGD momentum."
    weight_decay: float = 0.0
    "SGD weight decay."
    holdout_fraction: float = 0.1
    "Fraction of the TRAIN split (stratified by class) held out to choose the feature set and learning rate."
    refit: bool = True
    "Retrain the chosen head on the full train split before the single test evaluation (else keep it)."
    seed: int = 0
    "Seed of the hold-out split, head initialisation and batch order."
    device: str = "auto"
    "Where the heads train: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."

    def __post_init__(self) -> None:
        if not self.learning_rates or any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"learning_rates must be a non-empty list of positive numbers, got {self.learning_rates}")
        if self.n_last_blocks <= 0:
            raise ValueError(f"n_last_blocks must be > 0, got {self.n_last_blocks}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(kw_only=True)
class EvalRunConfig:
    """One evaluation run: the features come from a backbone over ``data``, or from an exported Parquet file."""

    backbone: BackboneConfig | None = None
    "Backbone to evaluate (unset when ``features`` is given)."
    data: DataConfig = field(default_factory=DataConfig)
    "Labelled inputs (unused when ``features`` is given)."
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    "Feature-extraction settings."
    features: str | None = None
    "Parquet file written by ``eval features`` with ``train`` and ``test`` rows; replaces backbone + data."
    knn: KnnConfig = field(default_factory=KnnConfig)
    "k-NN settings (``eval knn``)."
    linear: LinearConfig = field(default_factory=LinearConfig)
    "Linear-probe settings (``eval linear``)."
    output_dir: str = "eval_out"
    "Directory (local or fsspec URL) that receives knn.json / linear.json and the resolved config."

    def __post_init__(self) -> None:
        if self.features is not None:
            if self.backbone is not None:
                raise ValueError("features: give either a feature file or a backbone, not both")
            return
        if self.backbone is None:
            raise ValueError("backbone: set backbone.name / backbone.weights, or give features=<file.parquet>")
        if self.data.train is None or self.data.test is None:
            raise ValueError("data.train and data.test are both required when features are computed from a backbone")


@dataclass(kw_only=True)
class FeatureExportConfig:
    """Export backbone features of the train and/or test split to one Parquet file (``eval features``)."""

    backbone: BackboneConfig
    "Backbone to run."
    data: DataConfig = field(default_factory=DataConfig)
    "Labelled inputs; each of ``train`` / ``test`` that is set becomes a split of the file."
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    "Feature-extraction settings."
    mode: FeatureMode = "lastn_avgpool"
    "``cls``, ``lastn``, ``lastn_avgpool`` (serves both k-NN and every linear feature set) or ``avgpool``."
    n_last_blocks: int = 4
    "Blocks whose CLS tokens the ``lastn`` modes concatenate."
    output: str = "features.parquet"
    "Parquet file to write (local path or fsspec URL)."

    def __post_init__(self) -> None:
        if self.data.train is None and self.data.test is None:
            raise ValueError("data: set data.train and/or data.test to export their features")
        if self.n_last_blocks <= 0:
            raise ValueError(f"n_last_blocks must be > 0, got {self.n_last_blocks}")
        if not self.output.endswith(".parquet"):
            raise ValueError(f"output must be a .parquet file, got {self.output!r}")
