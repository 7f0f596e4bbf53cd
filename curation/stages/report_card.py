"""The dataset card of a run (``report/dataset_card.json``; ``DATASET_CARD.md`` is rendered from it by
:func:`curation.report.card.card_markdown`): what went into the shards and why, from the run's outputs alone.

Facts and where they come from (every read bounded: stage ``_SUCCESS.json`` records, ``clusters/sizes.json``,
``shards/index.json``, and per-part tasks that return small counts):

* run: name, seed, the sha256 of the resolved config (as ``config.toml`` holds it), the code version and config
  hash of every stage, and for an increment the chain of base runs (each run's ``config.toml`` names its ``base``);
* sources: files read, rejected by reason, images, and how far those images got (dedupe, selection), per entry of
  ``ingest.sources`` (:mod:`curation.stages.card_sources`);
* the funnel in stage order, each step's ``in = out + dropped`` with the reasons (rejects at ingest, duplicates and
  contaminated images at dedupe, selection reasons);
* dedupe and decontamination settings and results: candidate, checked and verified pairs, the largest components
  with their weakest link (the dedupe record's ``largest_components``, located by URI), matches per reference set
  (``decontam/part-*``);
* level-1 cluster balance before and after the balanced sample, the seed sets and their retrieval counts;
* the shard list with samples, bytes and sha256 (``shards/index.json``; a shard without a recorded sha256 is hashed
  by a task of its own).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow.compute as pc

from curation.io.artifacts import CLUSTERS_DIR, MANIFEST_DIR, SELECTION_DIR, SHARDS_DIR
from curation.io.fs import exists, get_fs, join, read_bytes, read_json, read_parquet
from curation.io.parts import code_version, part_name
from curation.stages.base import Executor
from curation.stages.card_sources import image_counts, occurrence_counts, source_matcher
from pretrain.utils.config import dump_toml, load_toml, to_dict

__all__ = ["CARD_VERSION", "build_card", "funnel", "resolved_config_sha256"]

log = logging.getLogger(__name__)

CARD_VERSION = 1
_MAX_CHAIN = 100


def resolved_config_sha256(config: Any) -> str:
    """sha256 of the resolved config as TOML (the bytes ``python -m curation`` writes to ``config.toml``)."""
    return hashlib.sha256(dump_toml(to_dict(config)).encode()).hexdigest()


def _step(stage: str, what: str, n_in: int, n_out: int, dropped: Mapping[str, int]) -> dict[str, Any]:
    dropped = {k: int(v) for k, v in dropped.items() if v}
    rest = n_in - n_out - sum(dropped.values())
    if rest:
        dropped["unaccounted"] = rest
    return {"stage": stage, "step": what, "in": n_in, "out": n_out, "dropped": dropped}


def funnel(recs: Mapping[str, dict[str, Any] | None]) -> tuple[list[dict[str, Any]], str | None]:
    """``(steps, selection)``: one step per stage that changes the image count, ``in = out + sum(dropped)``
    (any gap shows as ``unaccounted``), and the selection the shards were cut from (``selection``, ``balanced``,
    ``dedup`` or None before a selection exists)."""
    steps: list[dict[str, Any]] = []
    ing, emb, ded = recs.get("ingest"), recs.get("embed"), recs.get("dedupe")
    ret, clu, sha = recs.get("retrieve"), recs.get("cluster"), recs.get("shard")
    if ing:
        drops = {f"rejected: {k}": v for k, v in ing.get("rejected", {}).items()}
        drops.update({"exact duplicate (same bytes)": ing.get("duplicates", 0),
                      "already in a base run (same bytes)": ing.get("base_copies", 0)})  # fmt: skip
        steps.append(_step("ingest", "files read -> unique images", int(ing["in"]), int(ing["out"]), drops))
    if emb:
        steps.append(_step("embed", "images -> embedded", int(emb["in"]), int(emb["out"]), emb.get("rejected", {})))
    if ded:
        steps.append(_step("dedupe", "embedded -> kept", int(ded["in"]), int(ded["out"]), ded.get("rejected", {})))
    source = sha.get("selection") if sha else ("selection" if ret else "balanced" if clu and clu.get("balanced")
                                               is not None else None)  # fmt: skip
    if source == "selection" and ret:
        steps.append(_step("retrieve", "kept -> selected", int(ret["in"]), int(ret["out"]),
                           {"not selected": int(ret["in"]) - int(ret["out"])}))  # fmt: skip
        steps[-1]["selected_because"] = {k: int(v) for k, v in (ret.get("reasons") or {}).items()}
    elif source == "balanced" and clu:
        n = int(clu["balanced"])
        steps.append(_step("cluster", "kept -> balanced sample", int(clu["in"]), n,
                           {"not sampled": int(clu["in"]) - n}))  # fmt: skip
        steps[-1]["selected_because"] = {"balanced": n}
    if sha:
        steps.append(_step("shard", "selected -> sharded", int(sha["in"]), int(sha["out"]), sha.get("rejected", {})))
    return steps, source


def _run_section(config: Any, run_dir: str, recs: Mapping[str, dict[str, Any] | None]) -> dict[str, Any]:
    url = join(run_dir, "config.toml")
    on_disk = hashlib.sha256(read_bytes(url)).hexdigest() if exists(url) else None
    versions = {s: r.get("code_version") for s, r in recs.items() if r}
    return {"name": config.name, "run_dir": run_dir, "seed": config.seed, "stages": list(config.stages),
            "config_sha256": resolved_config_sha256(config), "config_toml_sha256": on_disk,
            "code_versions": sorted({v for v in versions.values() if v}), "report_code_version": code_version(),
            "stages_ran": {s: {"code_version": r.get("code_version"), "config_hash": r.get("config_hash"),
                               "seconds": r.get("seconds")} for s, r in recs.items() if r}}  # fmt: skip


def _chain(config: Any, run_dir: str) -> list[dict[str, Any]]:
    """Base runs, oldest first: each run's ``config.toml`` names its own ``base`` ("" or absent: a full run)."""
    chain: list[dict[str, Any]] = []
    base, seen = str(getattr(config, "base", "") or ""), {run_dir.rstrip("/")}
    while base and len(chain) < _MAX_CHAIN:
        base = base.rstrip("/")
        if base in seen:
            chain.append({"run_dir": base, "error": "the chain loops here"})
            break
        seen.add(base)
        url = join(base, "config.toml")
        if not exists(url):
            chain.append({"run_dir": base, "error": "no config.toml"})
            break
        cfg = load_toml(url)
        man = read_json(join(base, MANIFEST_DIR, "_SUCCESS.json")) or {}
        sha = read_json(join(base, SHARDS_DIR, "_SUCCESS.json")) or {}
        chain.append({"run_dir": base, "name": cfg.get("name"),
                      "config_sha256": hashlib.sha256(read_bytes(url)).hexdigest(),
                      "code_version": man.get("code_version"), "images": man.get("out"),
                      "shards": sha.get("shards"), "samples": sha.get("out")})  # fmt: skip
        base = str(cfg.get("base") or "")
    return chain[::-1]


def _sources(executor: Executor, config: Any, run_dir: str, recs: Mapping[str, Any], selection: str | None
             ) -> list[dict[str, Any]]:  # fmt: skip
    ing, ded = recs.get("ingest"), recs.get("dedupe")
    if not ing:
        return []
    matcher = source_matcher(config.ingest.sources)
    occ = occurrence_counts(executor, run_dir, int(ing["scan_parts"]), matcher)
    select: list[str] | None = []
    if selection == "selection":
        n = int((recs.get("retrieve") or {}).get("selection_parts", 1))
        select = [join(run_dir, SELECTION_DIR, part_name(i)) for i in range(n)]
    elif selection == "balanced":
        n = int((recs.get("cluster") or {}).get("balanced_parts", 1))
        select = [join(run_dir, CLUSTERS_DIR, "balanced", part_name(i)) for i in range(n)]
    elif selection == "dedup":
        select = None
    imgs = image_counts(executor, run_dir, int(ing["manifest_parts"]), matcher, select) if ded else {}
    labels = [*matcher.labels, "(matched by no source)"]
    kinds = [*matcher.kinds, "-"]
    rows = []
    for row in sorted(set(occ) | set(imgs), key=lambda r: r if r >= 0 else len(matcher.labels)):
        o, i = occ.get(row, {"read": 0, "tar_members": 0, "tars": 0, "rejected": {}}), imgs.get(row, {})
        rows.append({"source": labels[row], "kind": kinds[row], "read": o["read"], "tar_members": o["tar_members"],
                     "tars": o["tars"], "rejected": o["rejected"],
                     "accepted": o["read"] - sum(o["rejected"].values()), **i})  # fmt: skip
        if selection is None and "selected" in rows[-1]:
            rows[-1]["selected"] = None  # no selection yet
    return rows


def _locate_part(run_dir: str, uids: Sequence[str], index: int) -> dict[str, Any]:
    t = read_parquet(join(run_dir, MANIFEST_DIR, part_name(index)), columns=["uid", "uri"])
    t = t.filter(pc.is_in(t["uid"], value_set=pc.cast(list(uids), "string")))
    return {"part": index, "uris": dict(zip(t["uid"].to_pylist(), t["uri"].to_pylist()))}


def _locate(executor: Executor, run_dir: str, n_parts: int, uids: Sequence[str]) -> dict[str, str]:
    """``{uid: primary URI}`` of a few uids, searched part by part in ``manifest/``."""
    out: dict[str, str] = {}
    if uids:
        for r in executor.map(partial(_locate_part, run_dir, list(uids)), list(range(n_parts)), desc="card:locate"):
            out.update(r["uris"])
    return out


def _decontam_part(run_dir: str, index: int) -> dict[str, Any]:
    url = join(run_dir, "decontam", part_name(index))
    if not exists(url):
        return {"part": index, "matches": {}, "images": {}}
    t = read_parquet(url, columns=["uid", "reference"])
    pairs = set(zip(t["reference"].to_pylist(), t["uid"].to_pylist()))
    return {"part": index, "matches": dict(Counter(t["reference"].to_pylist())),
            "images": dict(Counter(ref for ref, _ in pairs))}  # fmt: skip


def _dedupe(executor: Executor, config: Any, run_dir: str, recs: Mapping[str, Any], chain: Sequence[Mapping[str, Any]]
            ) -> dict[str, Any]:  # fmt: skip
    d, rec = config.dedupe, recs["dedupe"]
    if d.verify:
        v = d.verification
        settings = {"copy decision": "two-stage: descriptor candidates verified on the images (local features)",
                    "candidate threshold": d.candidate_threshold, "candidates per image": d.max_candidates,
                    "verification": f"{v.model} model, >= {v.min_inliers} inliers, inlier ratio >= "
                                    f"{v.min_inlier_ratio:g}, spread >= {v.min_spread:g}, agreement >= "
                                    f"{v.min_agreement:g}, SIFT at {v.max_side} px"}  # fmt: skip
    else:
        settings = {"copy decision": "descriptor score above the threshold", "threshold": d.threshold}
    settings.update({"neighbours per image (k)": d.k, "embedding model": config.embed.model,
                     "keep policy": "the largest image of each component; components touching a reference image "
                                    "are dropped whole"})  # fmt: skip
    keys = ("plan", "components", "candidates", "checked_pairs", "connected_pairs", "verified", "verified_images",
            "verify_unreadable_pairs", "edge_recall", "recall_sample")  # fmt: skip
    results = {k: rec[k] for k in keys if rec.get(k) is not None}
    results["dropped"] = dict(rec.get("rejected", {}))
    largest = list(rec.get("largest_components") or [])
    n_manifest = int(recs["ingest"]["manifest_parts"]) if recs.get("ingest") else 0
    named = sorted({u for c in largest for u in (c.get("weakest_uid"), c.get("weakest_partner")) if u})
    where = _locate(executor, run_dir, n_manifest, named)
    comps = [{"component": c.get("component"), "size": c.get("size"), "weakest_uid": c.get("weakest_uid"),
              "weakest_uri": where.get(c.get("weakest_uid") or ""), "partner_uid": c.get("weakest_partner"),
              "partner_uri": where.get(c.get("weakest_partner") or ""), "score": c.get("weakest_score")}
             for c in largest]  # fmt: skip
    n_parts = int(rec.get("decontam_parts", 0)) if d.references or chain else 0
    matches: Counter[str] = Counter()
    images: Counter[str] = Counter()
    for r in executor.map(partial(_decontam_part, run_dir), list(range(n_parts)), desc="card:decontam"):
        matches.update(r["matches"])
        images.update(r["images"])
    refs = []
    if chain:  # an increment: its base runs are the reference set "base" (copies of base images are dropped)
        refs.append({"name": "base", "base_runs": True, "sources": [b["run_dir"] for b in chain],
                     "threshold": d.candidate_threshold if d.verify else d.threshold,
                     "images": sum(int(b.get("images") or 0) for b in chain), "matches": int(matches["base"]),
                     "pool_images_matched": int(images["base"])})  # fmt: skip
    for ref in d.references:
        ref_rec = read_json(join(run_dir, "references", ref.name, MANIFEST_DIR, "_SUCCESS.json")) or {}
        refs.append({"name": ref.name, "sources": list(ref.sources), "threshold": d.decontam_threshold,
                     "images": ref_rec.get("out"),
                     "matches": int(matches[ref.name]), "pool_images_matched": int(images[ref.name])})  # fmt: skip
    decontam = {"threshold": d.decontam_threshold, "reference_sets": refs,
                "matches": int(rec.get("decontam_matches", sum(matches.values()))),
                "contaminated_dropped": int(rec.get("rejected", {}).get("contaminated", 0))}  # fmt: skip
    return {"dedupe": {"settings": settings, "results": results, "largest_components": comps},
            "decontamination": decontam}  # fmt: skip


def _sizes(values: Sequence[int] | None) -> dict[str, Any] | None:
    if values is None:
        return None
    a = np.asarray(values, np.int64)
    nz = a[a > 0]
    return {"clusters": int(len(a)), "non_empty": int(len(nz)), "images": int(a.sum()),
            "smallest": int(nz.min()) if len(nz) else 0, "median": float(np.median(nz)) if len(nz) else 0.0,
            "largest": int(a.max()) if len(a) else 0,
            "largest_to_smallest": round(float(nz.max() / nz.min()), 2) if len(nz) else None}  # fmt: skip


def _clusters(config: Any, run_dir: str, rec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not rec:
        return None
    c = config.cluster
    sizes = read_json(join(run_dir, CLUSTERS_DIR, "sizes.json")) or {}
    return {"levels": [lv.n_clusters for lv in c.levels], "balanced_sample": c.target_size or None,
            "strategy": c.strategy if c.target_size else None, "level1_before": _sizes(sizes.get("level1_before")),
            "level1_after": _sizes(sizes.get("level1_after"))}  # fmt: skip


def _retrieval(config: Any, run_dir: str, rec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not rec:
        return None
    stats = rec.get("seed_sets") or {}
    sets = []
    for s in config.retrieve.seeds:
        how = (f"{s.n_per_seed} nearest per seed" if s.method == "knn" else
               f"{s.m_per_cluster} per cluster with >= {s.min_seeds_per_cluster} seeds ({s.pick})")  # fmt: skip
        ing = read_json(join(run_dir, "seeds", s.name, MANIFEST_DIR, "_SUCCESS.json")) or {}
        st = stats.get(s.name, {})
        sets.append({"name": s.name, "method": s.method, "rule": f"{how}, min score {s.min_score:g}, cap {s.cap}",
                     "sources": list(s.sources), "seed_images": st.get("seeds", ing.get("out")),
                     **{k: st.get(k) for k in ("pairs", "retrieved", "collided", "max_seeds_per_image")}})  # fmt: skip
    return {"seed_sets": sets, "include_balanced": config.retrieve.include_balanced, "selected": rec.get("out"),
            "reasons": dict(rec.get("reasons") or {})}  # fmt: skip


def _sha256_part(urls: Sequence[str], index: int) -> dict[str, Any]:
    h = hashlib.sha256()
    fs, path = get_fs(urls[index])
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"part": index, "sha256": h.hexdigest()}


def _shards(executor: Executor, config: Any, run_dir: str, rec: Mapping[str, Any] | None) -> dict[str, Any] | None:
    index = read_json(join(run_dir, SHARDS_DIR, "index.json")) if rec else None
    if not index:
        return None
    listed = [dict(s) for s in index["shards"]]
    todo = [i for i, s in enumerate(listed) if not s.get("sha256")]
    urls = [join(listed[i].get("run") or run_dir, SHARDS_DIR, listed[i]["name"]) for i in todo]
    for r in executor.map(partial(_sha256_part, urls), list(range(len(todo))), desc="card:sha256"):
        listed[todo[int(r["part"])]]["sha256"] = r["sha256"]
    s = config.shard
    return {"pattern": index.get("pattern"), "count": index.get("count"), "bytes": index.get("bytes"),
            "labelled": index.get("labelled"), "selection": index.get("selection"), "shuffle": index.get("shuffle"),
            "seed": index.get("seed"), "samples_per_shard": s.samples_per_shard, "label_from": s.label_from,
            "reencode": s.reencode, "max_side": s.max_side, "base": index.get("base"),
            "new_shards": index.get("new_shards"), "new_count": index.get("new_count"), "shards": listed}  # fmt: skip


def build_card(config: Any, run_dir: str, executor: Executor, recs: Mapping[str, dict[str, Any] | None]
               ) -> dict[str, Any]:  # fmt: skip
    """The dataset card of ``run_dir`` as a JSON-able dict. ``recs``: the ``_SUCCESS.json`` record of each stage
    (``ingest``, ``embed``, ``dedupe``, ``cluster``, ``retrieve``, ``shard``; None when it did not run)."""
    steps, selection = funnel(recs)
    card: dict[str, Any] = {"card_version": CARD_VERSION, "run": _run_section(config, run_dir, recs)}
    chain = _chain(config, run_dir)
    card["increment"] = {"base": str(getattr(config, "base", "") or ""), "chain": chain}
    card["sources"] = _sources(executor, config, run_dir, recs, selection)
    card["skipped_non_image"] = int((recs.get("ingest") or {}).get("skipped_non_image", 0))
    card["funnel"] = steps
    card["selection"] = selection
    card.update(_dedupe(executor, config, run_dir, recs, chain) if recs.get("dedupe") else {})
    card["clusters"] = _clusters(config, run_dir, recs.get("cluster"))
    card["retrieval"] = _retrieval(config, run_dir, recs.get("retrieve"))
    card["shards"] = _shards(executor, config, run_dir, recs.get("shard"))
    log.info("dataset card: %d sources, %d funnel steps, %s shards", len(card["sources"]), len(steps),
             len(card["shards"]["shards"]) if card["shards"] else 0)  # fmt: skip
    return card
