"""HTML tables of the report: the run's settings, the funnel and the per-stage counts (no Python reprs).

Pure functions of the run config and the stages' ``_SUCCESS.json`` records; every cell is escaped here.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["counts_text", "funnel_steps", "html_table", "settings_rows", "stage_rows"]


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """A ``<table>`` with one header row; cells are escaped, ``None`` shows as an empty cell."""
    attr = f" class='{cls}'" if cls else ""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return html.escape(counts_text(value))
    return html.escape(str(value))


def counts_text(counts: Mapping[str, Any]) -> str:
    """``{"duplicate": 12, "contaminated": 0}`` as ``duplicate 12, contaminated 0`` (zero counts left out;
    ``-`` when nothing is left)."""
    parts = [f"{k} {v}" for k, v in counts.items() if v]
    return ", ".join(parts) if parts else "-"


def funnel_steps(recs: Mapping[str, dict[str, Any] | None]) -> list[tuple[str, int, str]]:
    """``(step, images, dropped on the way there)`` in stage order: files read by ingest, accepted (unique
    decodable images), embedded, kept by dedupe, selected (retrieve or the balanced sample, whichever the shard
    stage read), sharded. Each step is a subset of the one before, so the counts never go up."""
    steps: list[tuple[str, int, str]] = []
    ing, emb, ded = recs.get("ingest"), recs.get("embed"), recs.get("dedupe")
    ret, clu, sha = recs.get("retrieve"), recs.get("cluster"), recs.get("shard")
    if ing:
        steps.append(("files read (ingest in)", int(ing["in"]), ""))
        drops = {**ing.get("rejected", {}), "exact duplicate": ing.get("duplicates", 0)}
        steps.append(("accepted (unique images)", int(ing["out"]), counts_text(drops)))
    if emb:
        steps.append(("embedded", int(emb["out"]), counts_text(emb.get("rejected", {}))))
    if ded:
        steps.append(("kept after dedupe", int(ded["out"]), counts_text(ded.get("rejected", {}))))
    source = sha.get("selection") if sha else None
    if ret and source in (None, "selection"):
        steps.append(("selected (retrieve)", int(ret["out"]), "not selected"))
    elif clu and clu.get("balanced") is not None and source in (None, "balanced"):
        steps.append(("selected (balanced sample)", int(clu["balanced"]), "not sampled"))
    if sha:
        steps.append(("sharded", int(sha["out"]), counts_text(sha.get("rejected", {}))))
    return [(name, n, "" if i == 0 else f"{steps[i - 1][1] - n}" + (f" ({why})" if why and why != "-" else ""))
            for i, (name, n, why) in enumerate(steps)]  # fmt: skip


def settings_rows(config: Any, ran: set[str]) -> list[tuple[str, str, str]]:
    """``(stage, setting, value)`` rows of what decided the run's output, for the stages that ran."""
    rows: list[tuple[str, str, str]] = [("run", "name", config.name), ("run", "seed", str(config.seed))]
    e, d, c, r, s = config.embed, config.dedupe, config.cluster, config.retrieve, config.shard
    if "embed" in ran:
        model = {"descriptor": "built-in descriptor (no weights)", "backbone": f"backbone {e.name}",
                 "torchscript": "TorchScript", "plugin": f"plugin {e.factory}"}[e.model]  # fmt: skip
        rows += [("embed", "model", model + (f", weights {e.weights}" if e.weights else "")),
                 ("embed", "image size", f"{e.image_size} ({e.resize})")]  # fmt: skip
    if "dedupe" in ran:
        rows.append(("dedupe", "neighbours per image (k)", str(d.k)))
        if d.verify:
            v = d.verification
            rows += [("dedupe", "copy decision", "two-stage: descriptor candidates, verified with local features"),
                     ("dedupe", "candidate threshold", f"{d.candidate_threshold:g} (best {d.max_candidates} per "
                      "image)"),
                     ("dedupe", "verification", f"{v.model} model, >= {v.min_inliers} inliers, inlier ratio >= "
                      f"{v.min_inlier_ratio:g}, spread >= {v.min_spread:g}, agreement >= {v.min_agreement:g}"),
                     ("dedupe", "single-threshold baseline (not used)", f"{d.threshold:g}")]  # fmt: skip
        else:
            rows += [("dedupe", "copy decision", "descriptor score above the threshold"),
                     ("dedupe", "threshold", f"{d.threshold:g}")]  # fmt: skip
        refs = ", ".join(x.name for x in d.references) or "none"
        rows.append(("dedupe", "decontamination", f"threshold {d.decontam_threshold:g}; reference sets: {refs}"))
        if d.background:
            rows.append(("dedupe", "score normalisation", f"background bias, beta {d.beta:g}, k {d.background_k}"))
    if "cluster" in ran:
        rows += [("cluster", "clusters per level", " / ".join(str(lv.n_clusters) for lv in c.levels)),
                 ("cluster", "balanced sample", f"{c.target_size} images ({c.strategy})" if c.target_size
                  else "none")]  # fmt: skip
    if "retrieve" in ran:
        for seed in r.seeds:
            how = (f"{seed.n_per_seed} nearest per seed" if seed.method == "knn" else
                   f"{seed.m_per_cluster} per cluster with >= {seed.min_seeds_per_cluster} seeds ({seed.pick})")
            rows.append(("retrieve", f"seed set {seed.name}", f"{seed.method}: {how}, min score {seed.min_score:g}, "
                         f"cap {seed.cap}; {len(seed.sources)} source(s)"))  # fmt: skip
        if not r.seeds:
            rows.append(("retrieve", "seed sets", "none"))
        rows.append(("retrieve", "balanced sample included", "yes" if r.include_balanced else "no"))
    if "shard" in ran:
        rows += [("shard", "samples per shard", str(s.samples_per_shard)),
                 ("shard", "order", "shuffled under the run seed" if s.shuffle else "uid order"),
                 ("shard", "labels", s.label_from)]  # fmt: skip
    return rows


def stage_rows(recs: Mapping[str, dict[str, Any] | None]) -> list[tuple[Any, ...]]:
    """One row per finished stage: in, out, dropped by reason, seconds, items/s, parts computed."""
    return [(name, r.get("in"), r.get("out"), counts_text(r.get("rejected") or {}), r.get("seconds"),
             r.get("items_per_s"), f"{r.get('parts_computed')}/{r.get('parts')}")
            for name, r in recs.items() if r]  # fmt: skip
