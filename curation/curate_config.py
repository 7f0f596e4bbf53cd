"""Config sections of the second half of a curation run: cluster, retrieve, shard and report.

They live apart from :mod:`curation.config` (which imports them into :class:`curation.config.RunConfig`) so the
stage modules can import both without a cycle. Every field is validated in ``__post_init__``; errors name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from curation.index.config import IndexConfig
from curation.index.hkmeans import LevelConfig

__all__ = ["ClusterConfig", "ReportConfig", "RetrieveConfig", "SeedSet", "ShardConfig"]


def _positive(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{section}.{name} must be a positive integer, got {value!r}")


def _non_negative(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{section}.{name} must be an integer >= 0, got {value!r}")


@dataclass(kw_only=True)
class ClusterConfig:
    """Spherical k-means (one level) or hierarchical k-means with resampling, and balanced sampling."""

    levels: list[LevelConfig] = field(default_factory=lambda: [LevelConfig(n_clusters=100)])
    """One entry per level (``n_clusters``, ``n_resampling_steps``, ``sample_size``, ``niter``,
    ``max_points_per_centroid``); level t clusters the centroids of level t-1. One level without resampling is
    plain spherical k-means."""
    train_points: int = 0
    """Kept images drawn (under the run seed) to train level 1; 0 = ``max_points_per_centroid`` x
    ``n_clusters`` of level 1 (faiss' subsampling rule). Every kept image is assigned afterwards."""
    target_size: int = 0
    """Balanced hierarchical sampling to exactly this many images (0 = no balanced sampling)."""
    strategy: Literal["random", "closest"] = "random"
    """Leaf picks of balanced sampling: random, or closest to their level-1 centroid."""
    use_gpu: bool | None = None
    """faiss GPU for training: true, false, or unset (GPU when faiss sees one)."""
    threads: int = 0
    """faiss threads in training and assignment tasks (0 = faiss default: the CPUs Ray reserved for the task).
    Results are deterministic for a given seed and thread count."""
    train_cpus: int = 1
    """CPUs reserved for the training task (at most one node's CPUs; faiss trains with that many threads)."""

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("cluster.levels must hold at least one level")
        for i, lvl in enumerate(self.levels):
            if not isinstance(lvl, LevelConfig):
                raise ValueError(f"cluster.levels[{i}] must be a table of LevelConfig fields")
            if i and lvl.n_clusters > self.levels[i - 1].n_clusters:
                raise ValueError(f"cluster.levels[{i}].n_clusters={lvl.n_clusters} must not exceed the level above "
                                 f"({self.levels[i - 1].n_clusters}): each level clusters the previous centroids")
        _non_negative("cluster", self, "train_points", "target_size", "threads")
        _positive("cluster", self, "train_cpus")
        if self.strategy not in ("random", "closest"):
            raise ValueError(f"cluster.strategy must be 'random' or 'closest', got {self.strategy!r}")


@dataclass(kw_only=True)
class SeedSet:
    """A curated seed set: its images are embedded by the embed model and retrieve pool images."""

    name: str
    """Short name; its manifest and embeddings go to ``seeds/<name>/`` in the run directory."""
    sources: list[str]
    """Image sources, same forms as ``ingest.sources``."""
    method: Literal["knn", "cluster"] = "knn"
    """``knn``: the ``n_per_seed`` nearest pool images of every seed (large seed sets); ``cluster``: ``m_per_cluster``
    pool images from every level-1 pool cluster holding more than ``min_seeds_per_cluster`` seeds (small sets)."""
    n_per_seed: int = 4
    """``knn``: pool neighbours per seed image (DINOv2: 4; 32 for ImageNet-1k)."""
    min_score: float = -1.0
    """``knn``: drop pairs with cosine similarity <= this (-1 keeps all)."""
    m_per_cluster: int = 10_000
    """``cluster``: pool images taken from each retrieved cluster (all of them when it is smaller)."""
    min_seeds_per_cluster: int = 3
    """``cluster``: a cluster is retrieved when it holds more than this many seed images."""
    pick: Literal["random", "closest"] = "random"
    """``cluster``: which pool images of a retrieved cluster (random, or closest to its centroid)."""
    cap: int = 1_000_000
    """Most pool images this seed set may retrieve (0 = no cap); ``knn`` keeps the best-scoring ones,
    ``cluster`` splits the cap over the clusters by water-filling."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"retrieve.seeds.name must be alphanumeric (-, _ allowed), got {self.name!r}")
        if not self.sources:
            raise ValueError(f"retrieve.seeds[{self.name}].sources must not be empty")
        if self.method not in ("knn", "cluster"):
            raise ValueError(f"retrieve.seeds[{self.name}].method must be 'knn' or 'cluster', got {self.method!r}")
        _positive(f"retrieve.seeds[{self.name}]", self, "n_per_seed", "m_per_cluster")
        _non_negative(f"retrieve.seeds[{self.name}]", self, "min_seeds_per_cluster", "cap")
        if not -1.0 <= self.min_score <= 1.0:
            raise ValueError(f"retrieve.seeds[{self.name}].min_score must be a cosine in [-1, 1], got {self.min_score}")
        if self.pick not in ("random", "closest"):
            raise ValueError(f"retrieve.seeds[{self.name}].pick must be 'random' or 'closest', got {self.pick!r}")


@dataclass(kw_only=True)
class RetrieveConfig:
    """Seed-based retrieval (DINOv2 appendix A.4) and the final selection."""

    seeds: list[SeedSet] = field(default_factory=list)
    """Curated seed sets."""
    include_balanced: bool = True
    """Add the cluster stage's balanced sample (when it made one) to the selection: selection = union of the
    retrieved images and the balanced sample, as DINOv3 combines both."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """faiss index for the seed -> pool kNN search."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.seeds]
        if len(set(names)) != len(names):
            raise ValueError(f"retrieve.seeds names must be unique, got {names}")


@dataclass(kw_only=True)
class ShardConfig:
    """WebDataset shards of the selected images."""

    prefix: str = "shard"
    """Shard names are ``{prefix}-{000000..}.tar`` in ``shards/``."""
    samples_per_shard: int = 10_000
    """Samples per shard (the last one holds the rest)."""
    max_shard_bytes: int = 0
    """Also close a shard before it would exceed this many bytes (0 = count limit only). Planned from the stored
    image sizes plus tar headers, so re-encoded images can make a shard differ slightly from the limit."""
    shuffle: bool = True
    """Globally shuffle the samples under the run seed before cutting shards (else sorted by uid)."""
    reencode: Literal["never", "non_jpeg", "always"] = "non_jpeg"
    """``non_jpeg``: JPEG sources keep their original bytes as ``uid.jpg``, other formats are decoded (EXIF
    orientation, RGB conversion) and re-encoded to JPEG; ``never``: every source keeps its bytes and extension
    (``uid.png``, ``uid.webp``, ...); ``always``: every image is re-encoded to JPEG."""
    max_side: int = 0
    """Downscale (and re-encode to JPEG) images whose longer side exceeds this (0 = keep the size)."""
    jpeg_quality: int = 95
    """Quality of re-encoded JPEGs."""
    label_from: Literal["none", "parent_dir"] = "none"
    """Where a sample's class label comes from: ``parent_dir`` = the name of the directory holding the image
    (for tar members: the directory inside the tar). Samples without a label get no ``.cls``."""
    classes: list[str] = field(default_factory=list)
    """With ``label_from = "parent_dir"``: class names; the label is the index of the directory name here
    (names not listed carry no label). Empty: the directory name itself must be an integer."""
    unlabelled: Literal["keep", "drop"] = "keep"
    """Samples without a label: ``keep`` (no ``.cls`` member) or ``drop`` (left out of the shards, counted as
    rejected ``unlabelled``), for shards that must be fully labelled."""
    selection: Literal["auto", "selection", "balanced", "dedup"] = "auto"
    """Which images: ``selection/`` of the retrieve stage, the cluster stage's balanced sample, or every image
    dedupe kept; ``auto`` takes the first of these that exists in the run."""

    def __post_init__(self) -> None:
        if not self.prefix or "/" in self.prefix or not self.prefix.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"shard.prefix must be a plain name (letters, digits, -, _), got {self.prefix!r}")
        _positive("shard", self, "samples_per_shard", "jpeg_quality")
        _non_negative("shard", self, "max_shard_bytes", "max_side")
        if self.jpeg_quality > 100:
            raise ValueError(f"shard.jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.reencode not in ("never", "non_jpeg", "always"):
            raise ValueError(f"shard.reencode must be never, non_jpeg or always, got {self.reencode!r}")
        if self.label_from not in ("none", "parent_dir"):
            raise ValueError(f"shard.label_from must be 'none' or 'parent_dir', got {self.label_from!r}")
        if self.unlabelled not in ("keep", "drop"):
            raise ValueError(f"shard.unlabelled must be 'keep' or 'drop', got {self.unlabelled!r}")
        if self.unlabelled == "drop" and self.label_from == "none":
            raise ValueError('shard.unlabelled = "drop" needs a label source: set shard.label_from')
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("shard.classes must not repeat a name")


@dataclass(kw_only=True)
class ReportConfig:
    """The visual report (``report/index.html`` + PNGs, viewable offline)."""

    clusters_shown: int = 4
    """Clusters per montage row group (largest, smallest and random)."""
    images_per_cluster: int = 12
    """Images per cluster montage."""
    thumb: int = 80
    """Thumbnail side in pixels."""
    duplicate_groups: int = 8
    """Duplicate groups shown side by side."""
    retrieval_seeds: int = 6
    """Random seeds whose retrieved neighbourhoods are shown."""

    def __post_init__(self) -> None:
        _positive("report", self, "clusters_shown", "images_per_cluster", "thumb", "retrieval_seeds")
        _non_negative("report", self, "duplicate_groups")
        if self.thumb < 16:
            raise ValueError(f"report.thumb must be >= 16, got {self.thumb}")
