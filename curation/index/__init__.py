"""Numerical core of curation: faiss kNN search, copy-detection dedup, decontamination, (hierarchical)
spherical k-means, balanced sampling and seed retrieval. Pure numpy/faiss: no Ray, no I/O."""

from curation.index.balanced import balanced_sample, cluster_sizes, level1_allocation, waterfill
from curation.index.config import IndexConfig, IndexPlan, plan_index
from curation.index.dedup import (
    DecontamResult,
    DedupResult,
    background_bias,
    components_from_knn,
    copy_detect,
    decontaminate,
)
from curation.index.hkmeans import Level, LevelConfig, closest_per_cluster, hierarchical_kmeans
from curation.index.join import SimilarityGraph, similarity_join
from curation.index.kmeans import INIT_METHODS, assign, lloyd_refine, spherical_kmeans
from curation.index.retrieval import (
    CollisionStats,
    cluster_take,
    collision_counts,
    collision_stats,
    retrieve_by_cluster,
    retrieve_knn,
)
from curation.index.search import FaissIndex, as_unit_float32, build_index, knn_search, self_knn
from curation.index.unionfind import component_sizes, connected_components

__all__ = [
    "INIT_METHODS", "CollisionStats", "DecontamResult", "DedupResult", "FaissIndex", "IndexConfig", "IndexPlan",
    "Level", "LevelConfig", "SimilarityGraph", "as_unit_float32", "assign", "background_bias", "balanced_sample",
    "build_index", "closest_per_cluster", "cluster_sizes", "cluster_take", "collision_counts", "collision_stats",
    "component_sizes", "components_from_knn", "connected_components", "copy_detect", "decontaminate",
    "hierarchical_kmeans", "knn_search", "level1_allocation", "lloyd_refine", "plan_index", "retrieve_by_cluster",
    "retrieve_knn", "self_knn", "similarity_join", "spherical_kmeans", "waterfill",
]
