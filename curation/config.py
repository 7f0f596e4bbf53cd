"""Typed curation run configuration: one dataclass per stage plus :class:`RunConfig` for the whole run.

A run is a TOML recipe plus dotted ``--set a.b=value`` overrides, loaded with
:func:`pretrain.utils.config.load_config`. Every field is validated in ``__post_init__`` and errors name the field.
Later stages (cluster, retrieve, shard, report) add their own section to :class:`RunConfig` and register a stage
in :mod:`curation.stages`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from curation.curate_config import ClusterConfig, ReportConfig, RetrieveConfig, ShardConfig
from curation.decode import DecodeLimits
from curation.index.config import IndexConfig
from pretrain.utils.config import to_dict

__all__ = [
    "DedupeConfig",
    "EmbedConfig",
    "IngestConfig",
    "RayConfig",
    "ReferenceSet",
    "RunConfig",
    "config_hash",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
#: Image formats listed too (so they are accounted as ``unsupported_format`` rejects) but never decoded.
UNSUPPORTED_EXTENSIONS = ("ico", "heic", "heif", "avif", "jp2", "jxl", "svg", "psd")


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
    """Backbone name for ``model = "backbone"`` (any ``pretrain.models.build_backbone`` name)."""
    weights: str = ""
    """Weights path or fsspec URL: a backbone checkpoint or the TorchScript file."""
    factory: str = ""
    """``package.module:function`` returning an embedder, for ``model = "plugin"``."""
    image_size: int = 224
    """Input side in pixels for neural models."""
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
        if self.image_size < 8:
            raise ValueError(f"embed.image_size must be >= 8, got {self.image_size}")
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
class DedupeConfig:
    """Copy detection (kNN graph, threshold, union-find) and decontamination against reference sets."""

    k: int = 64
    """Neighbours per image in the kNN graph."""
    threshold: float = 0.6
    """Cosine similarity above which two images are copies (DINOv2: 0.6 with SSCD features)."""
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

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"dedupe.k must be >= 1, got {self.k}")
        for name in ("threshold", "decontam_threshold"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise ValueError(f"dedupe.{name} must be a cosine in [-1, 1], got {v}")
        if self.background_k < 1 or self.beta < 0:
            raise ValueError("dedupe.background_k must be >= 1 and dedupe.beta >= 0")
        names = [r.name for r in self.references]
        if len(set(names)) != len(names):
            raise ValueError(f"dedupe.references names must be unique, got {names}")


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

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must not repeat, got {self.stages}")


def config_hash(*sections: Any) -> str:
    """Stable short hash of config sections (dataclasses or plain values)."""
    blob = json.dumps([to_dict(s) for s in sections], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]
