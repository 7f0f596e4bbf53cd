"""Report stage: ``report/index.html`` plus PNGs, self-contained (no script, no network), from a run's outputs.

Sections (each present when the stage it draws on finished in the run): the run's settings (model, thresholds,
k, balanced sample size, seed sets); the funnel in stage order (files read, accepted, embedded, kept, selected,
sharded) and the rejects by reason; score histograms with the thresholds marked (each image's best score by kept
or dropped; with verification, the candidate pairs' descriptor scores by verdict) and the image pairs just below
and just above each threshold (with verification also the copies verified at the lowest scores and the
look-alikes rejected at the highest); level-1 cluster sizes before and after balanced sampling; montages of the
largest, smallest and random clusters; the largest copy-detection groups side by side (kept image green, dropped
copies red, with their similarity); the retrieval neighbourhoods of random seeds (seed blue, retrieved pool images
by score) and the worst retrievals of every seed set; and a table of every stage's counts and timings. Numbers
are HTML tables. Images are read back from their sources by manifest location. The dataset card
(``DATASET_CARD.md`` and its JSON twin ``dataset_card.json``: what went into the shards and why) is written beside
it (:mod:`curation.stages.report_card`, :mod:`curation.report.card`).

**Memory contract.** The pool is only read by per-part tasks (:mod:`curation.stages.report_data`): cluster
sizes and copy-detection component sizes are aggregated from per-part counts (components through a bucketed
shuffle to the part holding their first member), montage and duplicate-group members are drawn by rank or by
order and fetched from the parts holding them; score histograms are fixed bins summed over per-part counts and
the borderline pairs are per-part top-m lists merged (:mod:`curation.stages.report_scores`). No process holds
more than one part of ``clusters/assign/``, ``dedup/``, ``verify/`` or ``retrieval/`` plus the shown images, the
level-1 cluster sizes and, for the retrieval section, the seed list. No knob: the bounds follow the part sizes
of the stages read.
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
from curation.report.card import write_card
from curation.report.draw import bar_chart, caption_tile, grid_rows, histogram, pair_tile, thumbnail
from curation.report.tables import funnel_steps, html_table, settings_rows, stage_rows
from curation.stages.base import Executor, Stage, register_stage
from curation.stages.report_card import build_card
from curation.stages.report_data import (
    cluster_members,
    cluster_sizes,
    component_members,
    largest_components,
    retrieval_hits,
)
from curation.stages.report_scores import dedup_scores, score_edges, verify_scores, worst_retrievals

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
        sections = [self._settings(recs), self._funnel(recs), self._scores(recs, executor), self._cluster_sizes(recs),
                    self._montages(recs, executor), self._duplicates(recs, executor), self._retrieval(recs),
                    self._worst_retrievals(recs, executor), self._table(recs)]  # fmt: skip
        body = "\n".join(s for s in sections if s)
        page = _PAGE.format(title=html.escape(f"Curation report: {self.config.name}"),
                            run=html.escape(self.run_dir), body=body)  # fmt: skip
        atomic_write_bytes(join(self.store.output, "index.html"), page.encode())
        pngs = sorted(set(_IMG.findall(page)))
        card = write_card(build_card(self.config, self.run_dir, executor, recs), self.store.output)
        self._parts_total = self._parts_computed = 1
        return {"in": len([r for r in recs.values() if r]), "out": len(pngs), "rejected": {}, "pngs": pngs,
                "card": card, "rows": {"pngs": len(pngs)}}  # fmt: skip

    # sections -----------------------------------------------------------------------------------------------

    def _settings(self, recs: dict[str, Any]) -> str:
        rows = settings_rows(self.config, {name for name, r in recs.items() if r})
        return "<h2>Settings</h2>" + html_table(["stage", "setting", "value"], rows, "settings")

    def _funnel(self, recs: dict[str, Any]) -> str:
        steps = funnel_steps(recs)
        rejects: dict[str, int] = {}
        for stage, rec in recs.items():
            dropped = {**(rec or {}).get("rejected", {}), **({"exact duplicate": rec.get("duplicates", 0)}
                                                             if stage == "ingest" and rec else {})}  # fmt: skip
            rejects.update({f"{stage}: {k}": int(v) for k, v in dropped.items()})
        funnel = self._write("funnel.png", bar_chart([n for _, n, _ in steps], [k for k, _, _ in steps],
                                                     title="Images at each step, in stage order"))  # fmt: skip
        rej = self._write("rejects.png", bar_chart(list(rejects.values()), list(rejects), title="Dropped, by reason",
                                                   color=(190, 90, 60)))  # fmt: skip
        reasons = ""
        if recs["retrieve"]:
            reasons = html_table(["selected because", "images"], list((recs["retrieve"].get("reasons") or {}).items()))
        return (f"<h2>Funnel</h2><img src='{funnel}'><img src='{rej}'>"
                + html_table(["step", "images", "dropped on the way (why)"], steps, "funnel")
                + html_table(["dropped", "images"], list(rejects.items())) + reasons)  # fmt: skip

    def _scores(self, recs: dict[str, Any], executor: Executor) -> str:
        d, cfg, rec = self.config.dedupe, self.config.report, recs["dedupe"]
        verified = d.verify and rec.get("verified") is not None
        thresholds = [d.candidate_threshold, d.threshold] if verified else [d.threshold]
        marks = ([(f"candidates >= {d.candidate_threshold:g}", d.candidate_threshold),
                  (f"single threshold {d.threshold:g} (not used)", d.threshold)] if verified
                 else [(f"threshold {d.threshold:g}", d.threshold)])  # fmt: skip
        edges, m = score_edges(thresholds), max(1, cfg.images_per_cluster // 2)
        best = dedup_scores(executor, self.run_dir, int(rec["dedup_parts"]), edges, thresholds, m)
        imgs = [self._write("scores_dedup.png", histogram(
            [("kept", best["kept"], KEPT), ("dropped", best["dropped"], DROPPED)], edges, marks=marks,
            title="Best score of each image to another (dedup/)"))]  # fmt: skip
        rows: list[tuple[str, list[dict[str, Any]]]] = []
        if verified:
            ver = verify_scores(executor, self.run_dir, int(rec.get("verify_parts", rec.get("blocks", 1))), edges,
                                thresholds, m)
            imgs.append(self._write("scores_verify.png", histogram(
                [("copy (verified)", ver["copy"], KEPT), ("not a copy", ver["not"], DROPPED)], edges, marks=marks,
                title="Candidate pairs by descriptor score, by verdict (verify/)")))  # fmt: skip
            names = {f"{d.candidate_threshold:g}": "candidate threshold", f"{d.threshold:g}": "single threshold"}
            rows += [(f"just {k}\n({names[k.split()[1]]})", v) for k, v in ver["near"].items()]
            rows += [("verified copies,\nlowest scores", ver["extremes"].get("copies", [])),
                     ("rejected look-alikes,\nhighest scores", ver["extremes"].get("look-alikes", []))]  # fmt: skip
        else:
            rows += [(f"just {k}\n(threshold)", v) for k, v in best["near"].items()]
        out = "<h2>Scores</h2>" + "".join(f"<img src='{i}'>" for i in imgs)
        rows = [(label, pairs) for label, pairs in rows if pairs]
        if not rows:
            return out + "<p>No image pairs near the thresholds.</p>"
        reader = ImageReader(self.run_dir, "", {u for _, ps in rows for p in ps for u in (p["uid"], p["other_uid"])},
                             self.config.ingest.decode)  # fmt: skip
        grid = [(label, [self._pair(reader.image(p["uid"], cfg.thumb), reader.image(p["other_uid"], cfg.thumb), p)
                         for p in pairs]) for label, pairs in rows]  # fmt: skip
        png = self._write("score_pairs.png", grid_rows(grid))
        what = ("green: verified copy, red: not a copy; caption: descriptor score, inliers" if verified
                else "caption: score of the image (left) to its nearest image (right)")  # fmt: skip
        return out + f"<h3>Pairs near the thresholds</h3><p>{html.escape(what)}.</p><img src='{png}'>"

    def _pair(self, a: Image.Image | None, b: Image.Image | None, p: dict[str, Any]) -> Image.Image:
        thumb = self.config.report.thumb
        if "verdict" not in p:
            return pair_tile(a, b, thumb, f"{p['score']:.3f}")
        color = KEPT if p["verdict"] else DROPPED
        return pair_tile(a, b, thumb, f"{p['score']:.3f} {p['inliers']} inl.", (color, color))

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
        table = html_table(["seed set", "method", "seeds", "pairs", "distinct images", "collided",
                            "max seeds per image"],
                           [(n, s["method"], s["seeds"], s["pairs"], s["retrieved"], s["collided"],
                             s["max_seeds_per_image"]) for n, s in stats.items()])  # fmt: skip
        return ("<h2>Retrieval</h2><p>Random seeds (blue) and the pool images they retrieved, best first.</p>"
                f"<img src='{png}'>{table}")  # fmt: skip

    def _worst_retrievals(self, recs: dict[str, Any], executor: Executor) -> str:
        if not recs["retrieve"] or not exists(join(self.run_dir, "retrieval", part_name(0))):
            return ""
        cfg = self.config.report
        n_parts = int(recs["retrieve"].get("retrieval_parts", 1))
        worst = worst_retrievals(executor, self.run_dir, n_parts, max(1, cfg.images_per_cluster // 2))
        if not worst:
            return ""
        decode = self.config.ingest.decode
        pool = ImageReader(self.run_dir, "", {p["uid"] for ps in worst.values() for p in ps}, decode)
        rows = []
        for name, pairs in worst.items():
            seeds = ImageReader(self.run_dir, f"seeds/{name}", {p["seed_uid"] for p in pairs}, decode)
            rows.append((f"{name}\n{len(pairs)} lowest", [
                pair_tile(seeds.image(p["seed_uid"], cfg.thumb), pool.image(p["uid"], cfg.thumb), cfg.thumb,
                          f"{p['score']:.3f}", (SEED, None)) for p in pairs]))  # fmt: skip
        png = self._write("retrieval_worst.png", grid_rows(rows))
        return ("<h2>Worst retrievals</h2><p>The lowest-scoring (seed, retrieved image) pairs of each seed set "
                f"(seed blue, left), lowest first.</p><img src='{png}'>")

    def _table(self, recs: dict[str, Any]) -> str:
        header = ["stage", "in", "out", "dropped", "seconds", "items/s", "parts computed"]
        return "<h2>Stages</h2>" + html_table(header, stage_rows(recs))


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
