"""The WebDataset sample contract shared by the curation shard writer and the pretraining / eval shard readers.

A sample is the tar members ``<key>.<ext>`` of one key: one image member (an extension of
:data:`IMAGE_EXTENSIONS`), optionally the integer class label ``<key>.cls`` (:data:`LABEL_KEY`, decimal text) and
metadata ``<key>.json`` (:data:`METADATA_KEY`). :mod:`curation.stages.shard` writes only image members listed
here; :mod:`pretrain.data.wds` (training) and :mod:`pretrain.eval.datasets` (evaluation) read exactly these.

Kept free of heavy imports (no torch) so the curation workers can import it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["IMAGE_EXTENSIONS", "LABEL_KEY", "METADATA_KEY", "image_member"]

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Image member extensions every reader accepts, in the order a reader looks for them."""
LABEL_KEY = "cls"
"""Member holding the integer class label."""
METADATA_KEY = "json"
"""Member holding the sample's metadata (curation lineage) as JSON."""


def image_member(sample: Mapping[str, Any], keys: Sequence[str] = IMAGE_EXTENSIONS) -> str | None:
    """The member key holding the sample's image: the first of ``keys`` present in ``sample`` (None if none is)."""
    return next((k for k in keys if k in sample), None)
