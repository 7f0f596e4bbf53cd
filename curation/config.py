"""Typed curation run configuration: one dataclass per stage plus :class:`RunConfig` for the whole run.

A run is a TOML recipe plus dotted ``--set a.b=value`` overrides, loaded with
:func:`pretrain.utils.config.load_config`. Every field is validated in ``__post_init__`` and errors name the field.
Every stage has its section here (ingest, embed, dedupe, cluster, retrieve, shard, report) and registers a stage
in :mod:`curation.stages`. Of curation it imports only leaf modules (:mod:`curation.decode` and the
:mod:`curation.index` package: ``IndexConfig``, ``LevelConfig``), which never import this one, so every curation
module can import it without a cycle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from curation.decode import DecodeLimits
from curation.index.config import IndexConfig
from curation.index.hkmeans import LevelConfig
from pretrain.utils.config import to_dict

__all__ = [
    "ClusterConfig",
    "DedupeConfig",
    "EmbedConfig",
    "IngestConfig",
    "RayConfig",
    "ReferenceSet",
    "ReportConfig",
    "RetrieveConfig",
    "RunConfig",
    "SeedSet",
    "ShardConfig",
    "VerifyConfig",
    "config_hash",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
#: Image formats listed too (so they are accounted as ``unsupported_format`` rejects) but never decoded.
UNSUPPORTED_EXTENSIONS = ("ico", "heic", "heif", "avif", "jp2", "jxl", "svg", "psd")


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
class IngestConfig:
    """Where images come from and how the listing is split into parallel parts."""

    sources: list[str] = field(default_factory=list)
    """Directories, globs, ``.tar`` shards (brace patterns allowed) or ``.parquet`` URI lists, on any fsspec fs."""
    uri_column: str = "uri"
    """Column holding image URIs in Parquet sources."""
    extensions: list[str] = field(default_factory=lambda: [*IMAGE_EXTENSIONS, *UNSUPPORTED_EXTENSIONS])
    """File extensions picked up when listing directories and tar shards (other files, e.g. WebDataset ``.json``
    side files, are skipped and counted); formats that cannot be decoded end in ``rejects/``."""
    files_per_part: int = 512
    """Loose files (or Parquet-listed URIs) per ingest task; each tar shard is one task."""
    rows_per_part: int = 4096
    """Target unique images per manifest part (also one embedding part)."""
    collapse_tasks: int = 64
    """Most tasks grouping exact duplicates; each reads every scan part once (a uid range of it)."""
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    """Decode limits (minimum side, maximum pixels and file bytes, accepted formats)."""

    def __post_init__(self) -> None:
        if self.files_per_part < 1:
            raise ValueError(f"ingest.files_per_part must be >= 1, got {self.files_per_part}")
        if self.collapse_tasks < 1:
            raise ValueError(f"ingest.collapse_tasks must be >= 1, got {self.collapse_tasks}")
        if self.rows_per_part < 1:
            raise ValueError(f"ingest.rows_per_part must be >= 1, got {self.rows_per_part}")
        if not self.uri_column:
            raise ValueError("ingest.uri_column must not be empty")
        self.extensions = [e.lower().lstrip(".") for e in self.extensions]
        if not self.extensions:
            raise ValueError("ingest.extensions must list at least one extension")


@dataclass(kw_only=True)
class EmbedConfig:
    """Which model embeds the images and how they are preprocessed and batched."""

    model: Literal["descriptor", "backbone", "torchscript", "plugin"] = "descriptor"
    """``descriptor`` (built-in, weight-free copy-detection descriptor), ``backbone`` (a ``pretrain.models``
    name), ``torchscript`` (a scripted module file) or ``plugin`` (``factory`` builds an embedder)."""
    name: str = "vits14"
    """Backbone name for ``model = "backbone"`` (any ``pretrain.models.build_backbone`` name), or ``auto``: the
    architecture recorded in the ``<weights>.json`` sidecar of a dinoforge export (``teacher.pth``,
    ``backbone.pth``)."""
    weights: str = ""
    """Weights path or fsspec URL: a backbone checkpoint or the TorchScript file."""
    factory: str = ""
    """``package.module:function`` returning an embedder, for ``model = "plugin"``."""
    image_size: int = 224
    """Input side in pixels for neural models (the pixel plugin: the side the pixels are taken at); 0 = the
    backbone's own ``img_size`` (``model = "backbone"`` only; e.g. 28 for a Fashion-MNIST export)."""
    resize: Literal["short_side_crop", "square"] = "short_side_crop"
    """``short_side_crop``: resize the short side then centre-crop; ``square``: resize to a fixed square."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel normalisation mean for neural models."""
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel normalisation std for neural models."""
    batch_size: int = 64
    """Images per forward pass."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the L2-normalised embeddings."""
    num_actors: int = 0
    """Embedding actors; 0 = one per GPU the cluster has now, or ``CPUs // cpus_per_actor`` CPU actors without
    GPUs. Set it on autoscaling clusters (GPU nodes appear only once actors ask for them)."""
    cpus_per_actor: int = 1
    """CPUs reserved per actor (decode threads inside it)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: GPU actors (bf16 autocast) when the cluster has GPUs; ``cuda``: always ask for one GPU per actor
    (autoscaling clusters); ``cpu``: CPU actors. The built-in descriptor always runs on CPU actors."""

    def __post_init__(self) -> None:
        if self.image_size < 8 and not (self.image_size == 0 and self.model == "backbone"):
            raise ValueError(f"embed.image_size must be >= 8 (0: the backbone's own size), got {self.image_size}")
        if self.batch_size < 1:
            raise ValueError(f"embed.batch_size must be >= 1, got {self.batch_size}")
        if self.num_actors < 0:
            raise ValueError(f"embed.num_actors must be >= 0, got {self.num_actors}")
        if self.cpus_per_actor < 1:
            raise ValueError(f"embed.cpus_per_actor must be >= 1, got {self.cpus_per_actor}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("embed.mean and embed.std need 3 values each, std > 0")
        if self.model == "torchscript" and not self.weights:
            raise ValueError('embed.weights must name the TorchScript file when embed.model = "torchscript"')
        if self.model == "plugin" and ":" not in self.factory:
            raise ValueError('embed.factory must look like "package.module:function" when embed.model = "plugin"')


@dataclass(kw_only=True)
class ReferenceSet:
    """An evaluation set to decontaminate against (its train and test splits)."""

    name: str
    """Short name; its manifest and embeddings go to ``references/<name>/`` in the run directory."""
    sources: list[str]
    """Image sources, same forms as ``ingest.sources``."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"dedupe.references.name must be alphanumeric (-, _ allowed), got {self.name!r}")
        if not self.sources:
            raise ValueError(f"dedupe.references[{self.name}].sources must not be empty")


@dataclass(kw_only=True)
class VerifyConfig:
    """Local-feature verification of candidate copy pairs (``curation.verify``): SIFT matches, then a geometric
    model constrained to plausible copy transforms fitted by RANSAC, also against the mirrored image."""

    max_side: int = 384
    """Images are downscaled (grayscale) so their long side is at most this before keypoint detection."""
    max_features: int = 384
    """Strongest SIFT keypoints kept per image (cost of matching grows with its square)."""
    contrast_threshold: float = 0.01
    """SIFT contrast threshold (OpenCV's, on a contrast-stretched image; lower finds keypoints in flatter, blurrier
    pictures, and the strongest ``max_features`` are kept anyway)."""
    match_ratio: float = 0.8
    """Lowe's ratio test: a match is kept when its descriptor distance is below this times the second best's;
    matches must also be mutual nearest neighbours. Repeated texture fails the test (many equal candidates)."""
    model: Literal["similarity", "affine", "homography"] = "affine"
    """Geometric model of a copy: ``similarity`` (scale, rotation, shift), ``affine`` (also aspect changes and
    mild shear) or ``homography`` (also perspective)."""
    ransac_threshold: float = 0.02
    """Inlier reprojection error, as a fraction of the long side of the second image."""
    max_scale: float = 8.0
    """Most scale change between the images either way (a crop upscaled or a thumbnail)."""
    max_anisotropy: float = 3.0
    """Most ratio of the model's two axis scales (aspect change plus shear); implausible models are rejected."""
    min_inliers: int = 8
    """Verdict: at least this many inliers (distinct keypoint locations consistent with the model)."""
    min_inlier_ratio: float = 0.2
    """Verdict: inliers / tentative (ratio-test, mutual) matches at least this."""
    min_spread: float = 0.05
    """Verdict: the inliers' convex hull covers at least this fraction of the area of one of the two images, so a
    single small matching patch (a caption, a logo, a texture detail) cannot verify a pair."""
    min_agreement: float = 0.5
    """Verdict: at least this fraction of the informative 8 x 8 cells of the region both images show (64-pixel
    thumbnails aligned by the model) correlate: a copy agrees over most of it, two pictures sharing only an
    overlay (caption, watermark, frame) agree only there."""

    def __post_init__(self) -> None:
        section = "dedupe.verification"
        _positive(section, self, "max_side", "max_features", "min_inliers")
        if self.max_side < 32:
            raise ValueError(f"{section}.max_side must be >= 32, got {self.max_side}")
        if self.min_inliers < 3:
            raise ValueError(f"{section}.min_inliers must be >= 3 (a model needs 3 points), got {self.min_inliers}")
        for name, lo, hi in (("contrast_threshold", 0.0, 1.0), ("match_ratio", 0.0, 1.0),
                             ("ransac_threshold", 0.0, 0.5), ("min_spread", -1e-9, 1.0),
                             ("min_inlier_ratio", -1e-9, 1.0), ("min_agreement", -1e-9, 1.0)):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not lo < v <= hi:
                raise ValueError(f"{section}.{name} must be a number in ({max(lo, 0.0)}, {hi}], got {v!r}")
        for name in ("max_scale", "max_anisotropy"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 1.0:
                raise ValueError(f"{section}.{name} must be a number >= 1, got {v!r}")
        if self.model not in ("similarity", "affine", "homography"):
            raise ValueError(f"{section}.model must be similarity, affine or homography, got {self.model!r}")


@dataclass(kw_only=True)
class DedupeConfig:
    """Copy detection (kNN graph, threshold, union-find) and decontamination against reference sets."""

    k: int = 64
    """Neighbours per image in the kNN graph."""
    threshold: float = 0.6
    """Cosine similarity above which two images are copies when ``verify`` is off (DINOv2: 0.6 with SSCD)."""
    verify: bool = True
    """Two-stage copy detection: the descriptor only proposes candidate pairs (``candidate_threshold``,
    ``max_candidates``), each verified on the images with local features (``verification``)."""
    candidate_threshold: float = 0.1
    """With ``verify``: descriptor score above which a pair is a candidate (permissive; verification decides).
    Calibrated with ``python bench/copy_verify.py``."""
    max_candidates: int = 32
    """With ``verify``: best-scoring candidates per image sent to verification."""
    verification: VerifyConfig = field(default_factory=VerifyConfig)
    """Local-feature verification settings (``curation.verify``)."""
    verify_task_pairs: int = 1024
    """With ``verify``: candidate pairs per verification task (about; a block's range is split into equal parts), so
    verification of a pool smaller than ``block_rows`` still runs on every CPU."""
    decontam_threshold: float = 0.45
    """Cosine similarity above which a pool image matches a reference image (DINOv2: 0.45)."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """faiss index choice (exact below a size threshold, IVF above, by memory budget; GPU when present)."""
    references: list[ReferenceSet] = field(default_factory=list)
    """Reference (evaluation) sets; every component touching one of their images is dropped."""
    background: list[str] = field(default_factory=list)
    """Sources of a background set (distinct images like the pool's) for SSCD score normalisation: each edge
    score becomes ``cos - beta * mean(bias_i, bias_j)``, bias = mean similarity to the ``background_k`` nearest
    background images. Empty = no normalisation. Embedded with the same model into ``background/``."""
    beta: float = 1.0
    """Weight of the background bias (SSCD default 1.0)."""
    background_k: int = 3
    """Background neighbours averaged into each image's bias (SSCD: neighbours 0..2)."""
    block_rows: int = 65_536
    """Memory bound of every dedupe task: vectors per block (reduce, components, keep, write), per IVF list
    group (join) and, divided by 8, per exact-plan tile. A task holds O(block_rows x (dim + k)) numbers."""
    replicas: int = 3
    """IVF plan (pools above ``index.exact_max``): each vector goes to its ``replicas`` nearest coarse lists and
    pairs are scored inside every list, so two copies are found when they share one of those lists. Higher =
    better recall, cost grows with replicas^2."""
    list_rows: int = 2048
    """IVF plan: target vectors per list (replicas counted); nlist = n x replicas / list_rows. Larger lists =
    better recall, cost grows linearly with it."""
    recall_sample: int = 1000
    """Pool vectors whose exact edges are computed to report the candidate generation's ``edge_recall``
    (0 = skip)."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"dedupe.k must be >= 1, got {self.k}")
        for name in ("block_rows", "replicas", "list_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"dedupe.{name} must be a positive integer, got {v!r}")
        if isinstance(self.recall_sample, bool) or not isinstance(self.recall_sample, int) or self.recall_sample < 0:
            raise ValueError(f"dedupe.recall_sample must be an integer >= 0, got {self.recall_sample!r}")
        _positive("dedupe", self, "max_candidates", "verify_task_pairs")
        for name in ("threshold", "decontam_threshold", "candidate_threshold"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"dedupe.{name} must be a cosine in [-1, 1], got {v}")
        if self.background_k < 1 or self.beta < 0:
            raise ValueError("dedupe.background_k must be >= 1 and dedupe.beta >= 0")
        names = [r.name for r in self.references]
        if len(set(names)) != len(names):
            raise ValueError(f"dedupe.references names must be unique, got {names}")


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
    rows_per_part: int = 100_000
    """Rows per ``clusters/balanced`` part (uid-range buckets): the most balanced rows one task holds."""
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
        _positive("cluster", self, "train_cpus", "rows_per_part")
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
    rows_per_part: int = 100_000
    """Planned rows per ``selection`` / ``retrieval`` part (uid-range buckets, sized from the most pairs and
    balanced rows there can be): the most rows one selection task holds."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.seeds]
        if len(set(names)) != len(names):
            raise ValueError(f"retrieve.seeds names must be unique, got {names}")
        _positive("retrieve", self, "rows_per_part")


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
    """Shuffle the samples under the run seed before cutting shards (else sorted by uid): uid-sorted, then
    permuted within each shard group (see ``group_rows``)."""
    group_rows: int = 1_000_000
    """Most selected samples one planning task holds: the selection is split by uid range into groups of at most
    this many samples, each shuffled and cut into shards on its own (shards numbered group by group). With one
    group (at most this many samples) the order is a single seeded permutation of the whole selection."""
    reencode: Literal["never", "non_jpeg", "always"] = "non_jpeg"
    """``non_jpeg``: JPEG sources keep their original bytes as ``uid.jpg``, other formats are decoded (EXIF
    orientation, RGB conversion) and re-encoded to JPEG; ``never``: JPEG, PNG and WebP sources keep their bytes and
    extension (``uid.jpg``, ``uid.png``, ``uid.webp``), while formats outside the WebDataset sample contract
    (:mod:`pretrain.utils.wds_sample`: BMP, TIFF, GIF) are still re-encoded to JPEG, so every image member is one
    the pretraining and eval readers accept; ``always``: every image is re-encoded to JPEG."""
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
        _positive("shard", self, "samples_per_shard", "jpeg_quality", "group_rows")
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


@dataclass(kw_only=True)
class RayConfig:
    """Where the stages run."""

    address: str = ""
    """``""``: join the cluster of ``ray job submit`` (``RAY_ADDRESS``) or start an in-process Ray;
    ``auto`` or ``ray://host:10001`` to connect to a running cluster; ``none`` runs without Ray (debugging)."""
    num_cpus: int = 0
    """CPUs of an in-process Ray (0 = all)."""
    max_in_flight: int = 0
    """Ray tasks submitted at once (0 = twice the cluster CPUs)."""

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.max_in_flight < 0:
            raise ValueError("ray.num_cpus and ray.max_in_flight must be >= 0")


@dataclass(kw_only=True)
class RunConfig:
    """A whole curation run: the stages to execute and one section per stage."""

    name: str = "curation"
    """Run name (informational)."""
    stages: list[str] = field(default_factory=lambda: ["ingest", "embed", "dedupe"])
    """Stages run in this order by ``python -m curation run``."""
    seed: int = 0
    """Seed for any randomised step."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    """Ingest stage."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """Embed stage."""
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    """Dedupe stage."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Execution backend."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Cluster stage (k-means / hierarchical k-means, balanced sampling)."""
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    """Retrieve stage (seed sets) and the final selection."""
    shard: ShardConfig = field(default_factory=ShardConfig)
    """Shard stage (WebDataset tars)."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """Report stage (offline HTML + PNGs)."""
    base: str = ""
    """Base run directory (``--base``): this run is an increment of it (:mod:`curation.io.chain`). Only the new
    sources are ingested and embedded; base images are never dropped, new copies of them are; new images are
    assigned to the base centroids; shards continue the base's numbering. ``""``: a full run."""

    def __post_init__(self) -> None:
        if not isinstance(self.base, str):
            raise ValueError(f"base must be a run directory path, got {self.base!r}")
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must not repeat, got {self.stages}")


def config_hash(*sections: Any) -> str:
    """Stable short hash of config sections (dataclasses or plain values)."""
    blob = json.dumps([to_dict(s) for s in sections], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]
