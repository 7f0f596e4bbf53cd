"""Report stage: ``report/index.html`` plus PNGs, self-contained (no script, no network), from a run's outputs.

Sections (each present when the stage it draws on finished in the run): the funnel (images per stage) and the
rejects by reason; level-1 cluster sizes before and after balanced sampling; montages of the largest, smallest
and random clusters; the largest copy-detection groups side by side (kept image green, dropped copies red, with
their similarity); the retrieval neighbourhoods of random seeds (seed blue, retrieved pool images by score); and
a table of every stage's counts and timings. Images are read back from their sources by manifest location.

**Memory contract.** The pool is only read by per-part tasks (:mod:`curation.stages.report_data`): cluster
sizes and copy-detection component sizes are aggregated from per-part counts (components through a bucketed
shuffle to the part holding their first member), montage and duplicate-group members are drawn by rank or by
order and fetched from the parts holding them. No process holds more than one part of ``clusters/assign/`` or
``dedup/`` plus the shown images, the level-1 cluster sizes and, for the retrieval section, the seed list. No
knob: the bounds follow the part sizes of the stages read.
"""

from __future__ import annotations

import html
import io
import logging
import re
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from curation.decode import DecodeError, load_rgb
from curation.io.artifacts import (
    CLUSTERS_DIR,
    DEDUP_DIR,
    EMBEDDINGS_DIR,
    MANIFEST_DIR,
    REPORT_DIR,
    SELECTION_DIR,
    SHARDS_DIR,
    manifest_parts,
)
from curation.io.fs import atomic_write_bytes, exists, get_fs, join, read_json, read_parquet
from curation.io.parts import PartStore, part_name
from curation.io.sources import read_location
from curation.report.draw import bar_chart, caption_tile, grid_rows, thumbnail
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.report_data import (
    cluster_members,
    cluster_sizes,
    component_members,
    largest_components,
    retrieval_hits,
)

__all__ = ["ImageReader", "ReportStage"]

log = logging.getLogger(__name__)

KEPT, DROPPED, SEED = (40, 160, 60), (200, 50, 50), (50, 90, 210)
_STAGES = ("ingest", "embed", "dedupe", "cluster", "retrieve", "shard")
_OUTPUTS = {"ingest": MANIFEST_DIR, "embed": EMBEDDINGS_DIR, "dedupe": DEDUP_DIR, "cluster": CLUSTERS_DIR,
            "retrieve": SELECTION_DIR, "shard": SHARDS_DIR}  # fmt: skip


class ImageReader:
    """Thumbnails of chosen uids of a run (pool or a ``seeds/<name>`` prefix), read by manifest location."""

    def __init__(self, run_dir: str, prefix: str, uids: set[str], limits: Any) -> None:
        self.limits = limits
        self.loc: dict[str, tuple[str, str | None, int, int]] = {}
        if not uids:
            return
        wanted = list(uids)
        for url in manifest_parts(PartStore(run_dir, "ingest", MANIFEST_DIR, prefix)):
            t = read_parquet(url, columns=["uid", "uri", "container", "offset", "size"])
            t = t.filter(pc.is_in(t["uid"], value_set=pc.cast(wanted, "string")))
            for r in t.to_pylist():
                self.loc[r["uid"]] = (r["uri"], r["container"], r["offset"], r["size"])

    def image(self, uid: str, size: int) -> Image.Image | None:
        if uid not in self.loc:
            return None
        uri, container, offset, n = self.loc[uid]
        try:
            return load_rgb(read_location(uri, container, offset, n), self.limits, draft_size=(size, size))
        except (DecodeError, OSError, ValueError) as exc:
            log.warning("report: cannot read %s: %s", uri, exc)
            return None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


@register_stage
class ReportStage(Stage):
    """Run outputs -> ``report/index.html`` + PNGs (viewable offline)."""

    name = "report"
    output = REPORT_DIR
    requires = ("dedupe",)

    def config_sections(self) -> tuple[Any, ...]:
        upstream = [(read_json(join(self.run_dir, _OUTPUTS[s], "_SUCCESS.json")) or {}).get("config_hash")
                    for s in _STAGES]  # fmt: skip
        return (self.config.report, self.config.seed, upstream)

    def execute(self, executor: Executor) -> dict[str, Any]:
        """Like every stage, but a report drawn from other inputs (a stage added or rerun since) is redrawn
        instead of refused: it is derived output only."""
        rec = read_json(self.store.success_url)
        if rec is not None and rec.get("config_hash") != self.config_hash:
            log.info("report: the run changed since %s was drawn; drawing it again", self.store.output)
            fs, path = get_fs(self.store.success_url)
            fs.rm(path)
        return super().execute(executor)

    def _success(self, stage: str) -> dict[str, Any] | None:
        return read_json(join(self.run_dir, _OUTPUTS[stage], "_SUCCESS.json"))

    def _write(self, name: str, img: Image.Image) -> str:
        atomic_write_bytes(join(self.store.output, name), _png(img))
        return name

    def run(self, executor: Executor) -> dict[str, Any]:
        self.rng = np.random.default_rng(self.config.seed)
        recs = {s: self._success(s) for s in _STAGES}
        sections = [self._funnel(recs), self._cluster_sizes(recs), self._montages(recs, executor),
                    self._duplicates(recs, executor), self._retrieval(recs), self._table(recs)]  # fmt: skip
        body = "\n".join(s for s in sections if s)
        page = _PAGE.format(title=html.escape(f"Curation report: {self.config.name}"),
                            run=html.escape(self.run_dir), body=body)  # fmt: skip
        atomic_write_bytes(join(self.store.output, "index.html"), page.encode())
        pngs = sorted(set(_IMG.findall(page)))
        self._parts_total = self._parts_computed = 1
        return {"in": len([r for r in recs.values() if r]), "out": len(pngs), "rejected": {}, "pngs": pngs,
                "rows": {"pngs": len(pngs)}}  # fmt: skip

    # sections -----------------------------------------------------------------------------------------------

    def _funnel(self, recs: dict[str, Any]) -> str:
        steps: list[tuple[str, int]] = []
        rejects: dict[str, int] = {}
        ing = recs["ingest"]
        if ing:
            steps += [("source files", ing["in"]), ("unique images", ing["out"])]
            rejects.update({f"ingest: {k}": v for k, v in ing["rejected"].items()})
            rejects["ingest: exact duplicate"] = ing.get("duplicates", 0)
        if recs["embed"]:
            steps.append(("embedded", recs["embed"]["out"]))
            rejects.update({f"embed: {k}": v for k, v in recs["embed"]["rejected"].items()})
        if recs["dedupe"]:
            steps.append(("kept (dedupe)", recs["dedupe"]["out"]))
            rejects.update({f"dedupe: {k}": v for k, v in recs["dedupe"]["rejected"].items()})
        if recs["cluster"]:
            steps.append(("clustered", recs["cluster"]["out"]))
            if recs["cluster"].get("balanced") is not None:
                steps.append(("balanced sample", recs["cluster"]["balanced"]))
        if recs["retrieve"]:
            steps.append(("selected", recs["retrieve"]["out"]))
        if recs["shard"]:
            steps.append(("sharded", recs["shard"]["out"]))
        funnel = self._write("funnel.png", bar_chart([v for _, v in steps], [k for k, _ in steps],
                                                     title="Images per stage"))  # fmt: skip
        rej = self._write("rejects.png", bar_chart(list(rejects.values()), list(rejects), title="Dropped, by reason",
                                                   color=(190, 90, 60)))  # fmt: skip
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in steps)
        rrows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in rejects.items())
        reasons = ""
        if recs["retrieve"]:
            reasons = "<p>Selection by reason: " + html.escape(str(recs["retrieve"].get("reasons"))) + "</p>"
        return (f"<h2>Funnel</h2><img src='{funnel}'><img src='{rej}'>{reasons}"
                f"<table><tr><th>stage</th><th>images</th></tr>{rows}</table>"
                f"<table><tr><th>dropped</th><th>images</th></tr>{rrows}</table>")  # fmt: skip

    def _cluster_sizes(self, recs: dict[str, Any]) -> str:
        sizes = read_json(join(self.run_dir, CLUSTERS_DIR, "sizes.json")) if recs["cluster"] else None
        if not sizes:
            return "<h2>Cluster sizes</h2><p>The cluster stage did not run.</p>"
        before = np.asarray(sizes["level1_before"])
        order = np.argsort(-before, kind="stable")
        imgs = [self._write("cluster_sizes_before.png", bar_chart(before[order].tolist(), [str(i) for i in order],
                            title=f"Level-1 cluster sizes ({len(before)} clusters, largest first)"))]  # fmt: skip
        text = f"max/min before balancing: {recs['cluster'].get('size_ratio_before')}"
        if sizes.get("level1_after") is not None:
            after = np.asarray(sizes["level1_after"])
            imgs.append(self._write("cluster_sizes_after.png", bar_chart(
                after[order].tolist(), [str(i) for i in order], color=(90, 150, 90),
                title=f"After balanced sampling ({int(after.sum())} images, same cluster order)")))  # fmt: skip
            text += f"; after: {recs['cluster'].get('size_ratio_after')}"
        return "<h2>Cluster sizes</h2>" + "".join(f"<img src='{i}'>" for i in imgs) + f"<p>{html.escape(text)}</p>"

    def _montages(self, recs: dict[str, Any], executor: Executor) -> str:
        if not recs["cluster"]:
            return ""
        cfg = self.config.report
        n_parts = int(recs["cluster"]["assign_parts"])
        sizes = cluster_sizes(executor, self.run_dir, n_parts, int(recs["cluster"]["clusters"][0]))
        nonempty = np.flatnonzero(sizes)
        by_size = nonempty[np.argsort(-sizes[nonempty], kind="stable")]
        k = cfg.clusters_shown
        largest, smallest = by_size[:k].tolist(), by_size[::-1][:k].tolist()
        rest = sorted(set(nonempty.tolist()) - set(largest) - set(smallest))
        rand = sorted(self.rng.choice(rest, size=min(k, len(rest)), replace=False).tolist()) if rest else []
        groups = {"largest": largest, "smallest": smallest, "random": rand}
        picks: dict[int, np.ndarray] = {}
        for c in {c for cs in groups.values() for c in cs}:  # ranks inside the cluster, in part order
            picks[c] = np.sort(self.rng.choice(int(sizes[c]), size=min(cfg.images_per_cluster, int(sizes[c])),
                                               replace=False))  # fmt: skip
        members = cluster_members(executor, self.run_dir, n_parts, picks)
        reader = ImageReader(self.run_dir, "", {u for m in members.values() for u in m}, self.config.ingest.decode)
        out = "<h2>Clusters</h2>"
        for name, cs in groups.items():
            rows = [(f"cluster {c}\n{sizes[c]} images", [thumbnail(reader.image(u, cfg.thumb), cfg.thumb)
                                                         for u in members[c]]) for c in cs]  # fmt: skip
            png = self._write(f"clusters_{name}.png", grid_rows(rows))
            out += f"<h3>{name.capitalize()} clusters</h3><img src='{png}'>"
        return out

    def _duplicates(self, recs: dict[str, Any], executor: Executor) -> str:
        cfg = self.config.report
        if not cfg.duplicate_groups:
            return ""
        n_parts = int(recs["dedupe"]["dedup_parts"])
        work = join(self.store.work, "components")
        images, top = largest_components(executor, self.run_dir, work, n_parts, cfg.duplicate_groups)
        if not images:
            return "<h2>Duplicate groups</h2><p>No images.</p>"
        if not top:
            return "<h2>Duplicate groups</h2><p>No copies found.</p>"
        size = dict(top)
        members = component_members(executor, self.run_dir, n_parts, list(size), cfg.images_per_cluster)
        shown = {c: members[c] for c in size}
        reader = ImageReader(self.run_dir, "", {r["uid"] for g in shown.values() for r in g},
                             self.config.ingest.decode)  # fmt: skip
        rows = []
        for c, g in shown.items():
            tiles = [caption_tile(thumbnail(reader.image(r["uid"], cfg.thumb), cfg.thumb,
                                            KEPT if r["keep"] else DROPPED),
                                  ("kept " if r["keep"] else "") + f"{r['score']:.3f}") for r in g]  # fmt: skip
            rows.append((f"component {c}\n{size[c]} images", tiles))
        png = self._write("duplicates.png", grid_rows(rows))
        return (f"<h2>Duplicate groups</h2><p>The {len(shown)} largest copy-detection components (green: kept, "
                f"red: dropped; caption: best similarity to another image).</p><img src='{png}'>")  # fmt: skip

    def _retrieval(self, recs: dict[str, Any]) -> str:
        url = join(self.run_dir, "retrieval", part_name(0))
        if not recs["retrieve"] or not exists(url):
            return "<h2>Retrieval</h2><p>The retrieve stage did not run.</p>"
        cfg = self.config.report
        n_parts = int(recs["retrieve"].get("retrieval_parts", 1))
        chosen, hits = retrieval_hits(self.run_dir, n_parts, self.rng, cfg.retrieval_seeds, cfg.images_per_cluster)
        if not chosen:
            return "<h2>Retrieval</h2><p>No pool image was retrieved.</p>"
        pool = ImageReader(self.run_dir, "", {p["uid"] for h in hits.values() for p in h}, self.config.ingest.decode)
        seed_readers = {name: ImageReader(self.run_dir, f"seeds/{name}", {u for n, u in chosen if n == name},
                                          self.config.ingest.decode) for name in {n for n, _ in chosen}}  # fmt: skip
        rows = []
        for name, su in chosen:
            tiles = [caption_tile(thumbnail(seed_readers[name].image(su, cfg.thumb), cfg.thumb, SEED), "seed")]
            tiles += [caption_tile(thumbnail(pool.image(p["uid"], cfg.thumb), cfg.thumb), f"{p['reason']} "
                                   f"{p['score']:.3f}") for p in hits[(name, su)]]  # fmt: skip
            rows.append((f"{name}\n{su[:10]}", tiles))
        png = self._write("retrieval.png", grid_rows(rows))
        stats = recs["retrieve"].get("seed_sets", {})
        lines = "".join(
            f"<tr><td>{html.escape(n)}</td><td>{s['method']}</td><td>{s['seeds']}</td><td>{s['pairs']}</td>"
            f"<td>{s['retrieved']}</td><td>{s['collided']}</td><td>{s['max_seeds_per_image']}</td></tr>"
            for n, s in stats.items()
        )
        return ("<h2>Retrieval</h2><p>Random seeds (blue) and the pool images they retrieved, best first.</p>"
                f"<img src='{png}'><table><tr><th>seed set</th><th>method</th><th>seeds</th><th>pairs</th>"
                f"<th>distinct images</th><th>collided</th><th>max seeds per image</th></tr>{lines}</table>")

    def _table(self, recs: dict[str, Any]) -> str:
        rows = "".join(
            f"<tr><td>{s}</td><td>{r.get('in')}</td><td>{r.get('out')}</td>"
            f"<td>{html.escape(str(r.get('rejected')))}</td><td>{r.get('seconds')}</td><td>{r.get('items_per_s')}</td>"
            f"<td>{r.get('parts_computed')}/{r.get('parts')}</td></tr>"
            for s, r in recs.items() if r
        )
        return ("<h2>Stages</h2><table><tr><th>stage</th><th>in</th><th>out</th><th>rejected</th><th>seconds</th>"
                f"<th>items/s</th><th>parts computed</th></tr>{rows}</table>")


_IMG = re.compile(r"<img src='([^']+)'>")
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #282828; max-width: 1400px; }}
img {{ display: block; margin: 8px 0; max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 8px 24px 8px 0; display: inline-table; vertical-align: top; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; text-align: left; }}
</style></head>
<body><h1>{title}</h1><p>Run directory: <code>{run}</code></p>
{body}
</body></html>
"""
