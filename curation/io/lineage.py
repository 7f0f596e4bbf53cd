"""Lineage: for a source URI, where its bytes went (uid, rejection, copy-detection component, kept or not)."""

from __future__ import annotations

import os
from typing import Any

import pyarrow.compute as pc

from curation.io.fs import get_fs, join, read_json, read_parquet

__all__ = ["lineage"]


def _parts(run_dir: str, subdir: str) -> list[str]:
    fs, path = get_fs(join(run_dir, subdir))
    if not fs.exists(path):
        return []
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [join(run_dir, subdir, n) for n in names if n.startswith("part-") and n.endswith(".parquet")]


def _normalise(uri: str) -> str:
    """A local path made absolute, as ingest records it; for a tar member (``<tar>#<member>``) only the tar's
    path is normalised: the member name is kept verbatim (a rejected member may be named ``a/../../b.jpg``)."""
    if "://" in uri:
        return uri
    cut = uri.find(".tar#")
    if cut >= 0:
        return os.path.abspath(uri[:cut + 4]) + uri[cut + 4:]
    return os.path.abspath(uri)


def lineage(run_dir: str, uri: str) -> dict[str, Any]:
    """Answer "what happened to ``uri``?" from the run's manifests.

    Returns a dict with ``uri``, ``found`` and, when found: ``uid``, ``status`` (``ok``/``rejected``),
    ``reason``/``detail`` for rejects, ``duplicate_uris`` (other sources with identical bytes) and, once dedupe
    ran, ``component``, ``kept``, ``contaminated``, ``nearest_uid``, ``score`` and ``decontam_matches``.
    """
    uri = _normalise(uri)
    out: dict[str, Any] = {"uri": uri, "found": False}
    for url in _parts(run_dir, "occurrences"):
        t = read_parquet(url)
        hit = t.filter(pc.equal(t["uri"], uri))
        if hit.num_rows:
            row = hit.to_pylist()[0]
            out.update(found=True, uid=row["uid"], status=row["status"], container=row["container"],
                       offset=row["offset"], size=row["size"])  # fmt: skip
            if row["status"] == "rejected":
                out.update(reason=row["reason"], detail=row["detail"], kept=False)
            break
    if not out["found"] or out["status"] != "ok":
        return out
    uid = out["uid"]
    cfg = read_json(join(run_dir, "manifest", "_SUCCESS.json")) or {}
    if cfg.get("base_copies"):  # an increment: these bytes may already be an image of a base run
        for url in _parts(run_dir, "base_copies"):
            t = read_parquet(url)
            hit = t.filter(pc.equal(t["uid"], uid))
            if hit.num_rows:
                base = hit["base_run"][0].as_py()
                out.update(status="in_base", base_run=base, kept=None,
                           note=f"exact copy of image {uid} of base run {base}: collapsed into it, not ingested again")
                return out
    for url in _parts(run_dir, "manifest"):
        t = read_parquet(url, columns=["uid", "uris"])
        hit = t.filter(pc.equal(t["uid"], uid))
        if hit.num_rows:
            out["duplicate_uris"] = [u for u in hit["uris"][0].as_py() if u != uri]
            break
    if read_json(join(run_dir, "dedup", "_SUCCESS.json")) is None:
        out["kept"] = None
        out["note"] = "dedupe has not finished in this run"
        return out
    for url in _parts(run_dir, "dedup"):
        t = read_parquet(url)
        hit = t.filter(pc.equal(t["uid"], uid))
        if hit.num_rows:
            row = hit.to_pylist()[0]
            out.update(component=row["component"], kept=row["keep"], contaminated=row["contaminated"],
                       nearest_uid=row["nearest_uid"], score=row["score"])  # fmt: skip
            break
    else:
        out.update(kept=False, note="no embedding (unreadable at embed time)")
    matches = []
    for url in _parts(run_dir, "decontam"):  # one part per dedupe block
        t = read_parquet(url)
        matches += t.filter(pc.equal(t["uid"], uid)).drop_columns(["uid"]).to_pylist()
    if _parts(run_dir, "decontam"):
        out["decontam_matches"] = matches
    return out
