"""Arrow schemas of every curation artifact, defined once.

``SOURCES`` (``occurrences/part-*``): one row per source occurrence (file or tar member), before exact
duplicates collapse. ``MANIFEST``: one row per unique accepted image (uid = sha1 of the bytes) with every URI it
was found at; ``uri``/``container``/``offset``/``size`` locate the bytes to read back. ``REJECTS``: one row per
rejected occurrence. ``embeddings(dim, dtype)``, ``DEDUP`` and ``DECONTAM`` follow the stages of the same names;
``assign_schema(n_levels)`` is the cluster stage's assignments, ``RETRIEVAL`` the retrieve stage's (seed, pool image)
pairs and ``SELECTION`` the selected images (retrieve's ``selection/``, cluster's balanced sample, the shard plan).
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "DECONTAM",
    "DEDUP",
    "MANIFEST",
    "REJECTS",
    "RETRIEVAL",
    "SELECTION",
    "SOURCES",
    "assign_schema",
    "embeddings",
]

SOURCES = pa.schema(
    [
        ("uri", pa.string()),  # file URI, or "<tar uri>#<member name>" for tar members
        ("container", pa.string()),  # tar shard URI for members, null for plain files
        ("offset", pa.int64()),  # byte offset of the member data inside the tar, -1 for plain files
        ("size", pa.int64()),  # bytes of the image
        ("uid", pa.string()),  # sha1 hex of the bytes, null when the bytes could not be read
        ("status", pa.string()),  # "ok" or "rejected"
        ("reason", pa.string()),  # reject reason code, null when ok
        ("detail", pa.string()),  # human-readable reject detail
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),  # PIL format name (JPEG, PNG, ...)
        ("mode", pa.string()),  # PIL mode before conversion to RGB
        ("n_frames", pa.int32()),
    ]
)

MANIFEST = pa.schema(
    [
        ("uid", pa.string()),
        ("uris", pa.list_(pa.string())),  # every source URI holding these exact bytes, sorted
        ("uri", pa.string()),  # primary location (first of ``uris``)
        ("container", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("n_frames", pa.int32()),
    ]
)

#: ``base_copies/part-N`` of an increment: new images whose exact bytes a base run already holds (collapsed into
#: the base uid, with the new URIs).
BASE_COPIES = pa.schema(
    [
        ("uid", pa.string()),  # the base image's uid (sha1 of the bytes)
        ("uris", pa.list_(pa.string())),  # the increment's URIs holding these bytes
        ("base_run", pa.string()),  # the run of the chain that holds the image
    ]
)

REJECTS = pa.schema(
    [
        ("uri", pa.string()),
        ("uid", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

DEDUP = pa.schema(
    [
        ("uid", pa.string()),
        ("component", pa.int64()),  # copy-detection component id (index of its first member, run-wide)
        ("keep", pa.bool_()),  # kept by the keep policy and not contaminated
        ("nearest_uid", pa.string()),  # most similar other pool image, null if none
        ("score", pa.float32()),  # similarity to nearest_uid
        ("contaminated", pa.bool_()),  # component touches a reference image
    ]
)

DECONTAM = pa.schema(
    [
        ("uid", pa.string()),  # pool image
        ("reference", pa.string()),  # reference set name
        ("ref_uid", pa.string()),
        ("ref_uri", pa.string()),
        ("score", pa.float32()),
    ]
)


def embeddings(dim: int, dtype: str) -> pa.Schema:
    """Schema of ``embeddings/part-*``: uid and an L2-normalised fixed-size vector."""
    value = {"float16": pa.float16(), "float32": pa.float32()}[dtype]
    return pa.schema([("uid", pa.string()), ("emb", pa.list_(value, dim))])


def assign_schema(n_levels: int) -> pa.Schema:
    """Schema of ``clusters/assign/part-*``: uid, ``l1..lK`` cluster ids, dist to the level-1 centroid."""
    return pa.schema(
        [("uid", pa.string())] + [(f"l{k}", pa.int32()) for k in range(1, n_levels + 1)] + [("dist", pa.float32())]
    )


RETRIEVAL = pa.schema(
    [
        ("seed_set", pa.string()),
        ("seed_uid", pa.string()),
        ("uid", pa.string()),  # retrieved pool image
        ("score", pa.float32()),  # cosine similarity seed <-> pool image
        ("reason", pa.string()),  # knn | cluster
        ("rank", pa.int32()),  # knn: neighbour rank of the pool image for this seed; cluster: level-1 cluster
    ]
)

#: One row per selected image: why it is selected and, for retrieval, by which seed.
SELECTION = pa.schema(
    [
        ("uid", pa.string()),
        ("reason", pa.string()),  # knn | cluster | balanced (| kept when sharding every kept image)
        ("seed_set", pa.string()),  # seed set that retrieved it (null for balanced)
        ("seed_uid", pa.string()),  # best-scoring seed image (null for balanced)
        ("score", pa.float32()),  # cosine to that seed (balanced: cosine to its level-1 centroid)
        ("n_seeds", pa.int32()),  # how many seed images retrieved it (collisions)
    ]
)
