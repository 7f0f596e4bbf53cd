"""Evaluation of frozen backbones: weighted k-NN and linear probes over labelled image inputs."""

from .config import (
    BackboneConfig,
    DataConfig,
    EvalRunConfig,
    ExtractConfig,
    FeatureExportConfig,
    KnnConfig,
    LinearConfig,
)
from .datasets import detect_format, make_loader, open_dataset
from .features import FeatureSet, extract_features, load_features, save_features
from .knn import KnnResult, knn_evaluate, knn_neighbors, knn_predict
from .linear import LinearResult, LinearSelection, run_linear_probe, select_linear_head
from .run import extract_split, knn_eval_model, linear_eval_model, load_backbone
from .transforms import EvalTransform

__all__ = [
    "BackboneConfig", "DataConfig", "EvalRunConfig", "EvalTransform", "ExtractConfig", "FeatureExportConfig",
    "FeatureSet", "KnnConfig", "KnnResult", "LinearConfig", "LinearResult", "LinearSelection", "detect_format",
    "extract_features", "knn_evaluate", "knn_neighbors", "knn_predict", "load_features", "make_loader",
    "open_dataset", "run_linear_probe", "save_features", "select_linear_head", "extract_split", "knn_eval_model",
    "linear_eval_model", "load_backbone",
]
