"""Readers of a run's artifacts (manifest, embeddings, dedup, clusters), shared by the stages, the report and the demo.

They read finished outputs by path (``<output>/_SUCCESS.json`` and its parts), never through the stage classes,
so any stage can import them without a cycle. The output directory names are defined here and used by the stage
classes as their ``output``.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from curation import schemas
from curation.io.fs import get_fs, join, read_json, read_parquet
from curation.io.parts import PartStore, part_name

__all__ = [
    "CLUSTERS_DIR",
    "DEDUP_DIR",
    "EMBEDDINGS_DIR",
    "MANIFEST_DIR",
    "REPORT_DIR",
    "SELECTION_DIR",
    "SHARDS_DIR",
    "balanced_parts",
    "keep_mask",
    "kept_counts",
    "kept_embeddings",
    "load_assignments",
    "load_centroids",
    "load_embeddings",
    "load_kept",
    "manifest_parts",
    "n_embedding_parts",
    "retrieval_parts",
    "selection_parts",
]

#: Output directories of the stages in a run directory (``Stage.output``).
MANIFEST_DIR = "manifest"  # ingest
BASE_COPIES_DIR = "base_copies"  # ingest of an increment: exact copies of base images
EMBEDDINGS_DIR = "embeddings"  # embed
DEDUP_DIR = "dedup"  # dedupe
CLUSTERS_DIR = "clusters"  # cluster
SELECTION_DIR = "selection"  # retrieve
SHARDS_DIR = "shards"  # shard
REPORT_DIR = "report"  # report


def manifest_parts(store: PartStore) -> list[str]:
    """URLs of the manifest parts of a finished ingest, in order."""
    rec = read_json(store.success_url)
    if rec is None:
        raise ValueError(f"no finished ingest in {store.root}: run the ingest stage first")
    return [join(store.root, MANIFEST_DIR, part_name(i)) for i in range(int(rec["manifest_parts"]))]


def load_embeddings(run_dir: str, prefix: str = "") -> tuple[list[str], np.ndarray, list[int]]:
    """All embeddings of a finished embed stage: ``(uids, float32 matrix, part sizes)`` in part order."""
    store = PartStore(run_dir, "embed", EMBEDDINGS_DIR, prefix)
    rec = read_json(store.success_url)
    if rec is None:
        raise ValueError(f"no finished embed stage in {store.root}: run the embed stage first")
    uids: list[str] = []
    mats: list[np.ndarray] = []
    sizes: list[int] = []
    dim = int(rec["dim"])
    for i in range(int(rec["embedding_parts"])):
        t = read_parquet(join(store.root, EMBEDDINGS_DIR, part_name(i)))
        uids += t["uid"].to_pylist()
        flat = t["emb"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        mats.append(np.asarray(flat, dtype=np.float32).reshape(t.num_rows, dim))
        sizes.append(t.num_rows)
    mat = np.concatenate(mats) if mats else np.zeros((0, dim), np.float32)
    return uids, mat, sizes


def n_embedding_parts(run_dir: str) -> tuple[int, int]:
    """``(parts, dim)`` of the finished pool embed stage."""
    rec = read_json(join(run_dir, EMBEDDINGS_DIR, "_SUCCESS.json"))
    if rec is None:
        raise ValueError(f"no finished embed stage in {run_dir}: run the embed stage first")
    return int(rec["embedding_parts"]), int(rec["dim"])


def keep_mask(run_dir: str, index: int) -> tuple[list[str], np.ndarray]:
    """Uids of dedup part ``index`` and whether dedupe kept each."""
    t = read_parquet(join(run_dir, DEDUP_DIR, part_name(index)), columns=["uid", "keep"])
    return t["uid"].to_pylist(), np.asarray(t["keep"].to_numpy(zero_copy_only=False), bool)


def kept_embeddings(run_dir: str, index: int, dim: int) -> tuple[list[str], np.ndarray]:
    """Uids and float32 embeddings of the images dedupe kept in embedding part ``index``."""
    t = read_parquet(join(run_dir, EMBEDDINGS_DIR, part_name(index)))
    uids = t["uid"].to_pylist()
    dedup_uids, keep = keep_mask(run_dir, index)
    if dedup_uids != uids:
        raise ValueError(f"dedup part {index} is not aligned with embeddings part {index} in {run_dir}; "
                         "rerun dedupe")  # fmt: skip
    flat = t["emb"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    mat = np.asarray(flat, dtype=np.float32).reshape(t.num_rows, dim)[keep]
    mat /= np.maximum(np.linalg.norm(mat, axis=1, keepdims=True), 1e-12)  # float16 storage: renormalise
    return [u for u, k in zip(uids, keep) if k], mat


def kept_counts(run_dir: str) -> list[int]:
    """Images dedupe kept in every embedding part (one part read at a time)."""
    n_parts, _ = n_embedding_parts(run_dir)
    return [int(np.asarray(read_parquet(join(run_dir, DEDUP_DIR, part_name(i)), columns=["keep"])["keep"]
                           .to_numpy(zero_copy_only=False), bool).sum()) for i in range(n_parts)]  # fmt: skip


def load_kept(run_dir: str) -> tuple[list[str], np.ndarray]:
    """Uids and embeddings of every image dedupe kept, in part order (aligned with ``clusters/assign``)."""
    n_parts, dim = n_embedding_parts(run_dir)
    uids: list[str] = []
    mats = []
    for i in range(n_parts):
        u, m = kept_embeddings(run_dir, i, dim)
        uids += u
        mats.append(m)
    return uids, np.concatenate(mats) if mats else np.zeros((0, dim), np.float32)


def _load_npy(url: str) -> np.ndarray:
    """A ``.npy`` array from any fsspec URL (no pickles)."""
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def load_centroids(run_dir: str, n_levels: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(centroids per level, parent map per level below the top)`` of a trained cluster stage."""
    root = join(run_dir, CLUSTERS_DIR)
    cents = [_load_npy(join(root, f"level{k}", "centroids.npy")) for k in range(1, n_levels + 1)]
    parents = [_load_npy(join(root, f"level{k}", "parent.npy")) for k in range(1, n_levels)]
    return cents, parents


def load_assignments(run_dir: str) -> pa.Table:
    """All rows of ``clusters/assign/`` of a finished cluster stage, in part order."""
    rec = read_json(join(run_dir, CLUSTERS_DIR, "_SUCCESS.json"))
    if rec is None:
        raise ValueError(f"no finished cluster stage in {run_dir}: run the cluster stage first")
    tables = [read_parquet(join(run_dir, CLUSTERS_DIR, "assign", part_name(i)))
              for i in range(int(rec["assign_parts"]))]  # fmt: skip
    return pa.concat_tables(tables) if tables else schemas.assign_schema(int(rec["levels"])).empty_table()


def balanced_parts(run_dir: str) -> list[str]:
    """URLs of the balanced-sample parts of a finished cluster stage, in uid order ([] when it drew none)."""
    rec = read_json(join(run_dir, CLUSTERS_DIR, "_SUCCESS.json"))
    if rec is None or rec.get("balanced") is None:
        return []
    n = int(rec.get("balanced_parts", 1))  # records before the part count: one part
    return [join(run_dir, CLUSTERS_DIR, "balanced", part_name(i)) for i in range(n)]


def _retrieve_parts(run_dir: str, subdir: str, key: str) -> list[str]:
    rec = read_json(join(run_dir, SELECTION_DIR, "_SUCCESS.json"))
    if rec is None:
        return []
    n = int(rec.get(key, 1))  # records before the retrieval part count: one part
    return [join(run_dir, subdir, part_name(i)) for i in range(n)]


def selection_parts(run_dir: str) -> list[str]:
    """URLs of the ``selection/`` parts of a finished retrieve stage, in uid order ([] when it has not finished)."""
    return _retrieve_parts(run_dir, SELECTION_DIR, "selection_parts")


def retrieval_parts(run_dir: str) -> list[str]:
    """URLs of the ``retrieval/`` pair parts of a finished retrieve stage ([] when it has not finished)."""
    return _retrieve_parts(run_dir, "retrieval", "retrieval_parts")
