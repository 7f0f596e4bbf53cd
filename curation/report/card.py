"""``DATASET_CARD.md``: the dataset card dict of :func:`curation.stages.report_card.build_card` as Markdown.

A pure function of the dict, so the Markdown and ``dataset_card.json`` hold the same facts. Sections: a summary
line (the funnel), the run (directory, increment chain, code version, resolved config hash), sources, the funnel
with reasons, copy detection and decontamination (settings, results, largest components with their weakest link,
reference sets), cluster balance, seed sets and retrieval, shards (samples, bytes, sha256) and provenance per
stage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from curation.io.fs import atomic_write_bytes, join

__all__ = ["CARD_JSON", "CARD_MD", "card_markdown", "md_table", "write_card"]

CARD_MD = "DATASET_CARD.md"
CARD_JSON = "dataset_card.json"


def _v(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, Mapping):
        parts = [f"{k} {_v(n)}" for k, n in x.items() if n]
        return ", ".join(parts) if parts else "-"
    if isinstance(x, list | tuple):
        return ", ".join(_v(i) for i in x) if x else "-"
    return str(x)


def _cell(x: Any) -> str:
    return _v(x).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; ``|`` in cells is escaped, ``None`` shows as ``-``, ints with separators."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    unit, x = "B", float(n)
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if x < 1024:
            break
        unit, x = u, x / 1024
    return f"{n:,} bytes" + (f" ({x:.1f} {unit})" if unit != "B" else "")


def _summary(card: Mapping[str, Any]) -> str:
    steps = card.get("funnel") or []
    if not steps:
        return "No stage with images finished."
    first = steps[0]["step"].split(" -> ")[0]
    chain = [f"{_v(steps[0]['in'])} {first}"] + [f"{_v(s['out'])} {s['step'].split(' -> ')[-1]}" for s in steps]
    text = " -> ".join(chain) + "."
    sel = next((s.get("selected_because") for s in steps if s.get("selected_because")), None)
    if sel:
        text += f" Selected because: {_v(sel)}."
    sh = card.get("shards")
    if sh:
        new = f", {_v(sh['new_shards'])} of them new in this increment" if sh.get("new_shards") is not None else ""
        text += f" Shards: {_v(len(sh['shards']))} files `{sh['pattern']}`{new}, {_size(sh['bytes'])}."
    return text


def _run(card: Mapping[str, Any]) -> str:
    run, inc = card["run"], card["increment"]
    chain = inc.get("chain") or []
    base = (" -> ".join(f"`{b['run_dir']}`" for b in chain) + " -> this run") if chain else "none (full run)"
    versions = run["code_versions"]
    code = versions[0] + " (every stage)" if len(versions) == 1 else (", ".join(versions) or "-") + " (per stage below)"
    cfg = f"sha256 `{run['config_sha256']}`"
    if run.get("config_toml_sha256") and run["config_toml_sha256"] != run["config_sha256"]:
        cfg += f" (the run's `config.toml` differs: sha256 `{run['config_toml_sha256']}`, a later invocation's)"
    elif run.get("config_toml_sha256"):
        cfg += " (= `config.toml`)"
    rows = [("run directory", f"`{run['run_dir']}`"), ("increment of (base runs, oldest first)", base),
            ("code version", code), ("resolved config", cfg), ("seed", run["seed"]),
            ("stages", " -> ".join(run["stages"]))]  # fmt: skip
    return md_table(["run", ""], rows)


def _sources(card: Mapping[str, Any]) -> str:
    rows = [(f"`{s['source']}`", s["kind"] + (f" ({_v(s['tar_members'])} members of {_v(s['tars'])} tars)"
                                            if s.get("tars") else ""),
             s["read"], s["rejected"], s["accepted"], s.get("images"),
             s.get("not embedded"), s.get("duplicate"), s.get("contaminated"), s.get("kept"), s.get("selected"))
            for s in card["sources"]]  # fmt: skip
    note = ("Files and tar members count under the first `ingest.sources` entry naming them (path, directory or "
            "glob; the rest under the Parquet URI list); an image found in several sources counts under each. "
            "Images: unique after exact duplicates collapse; each ends not embedded, dropped as a near-duplicate, "
            "dropped as contaminated or kept; selected: what the shards were cut from.")  # fmt: skip
    if card.get("skipped_non_image"):
        note += f" Tar side files skipped (not images): {_v(card['skipped_non_image'])}."
    header = ["source", "kind", "files read", "rejected (why)", "accepted", "images", "not embedded",
              "near-duplicates", "contaminated", "kept", "selected"]  # fmt: skip
    return md_table(header, rows) + "\n\n" + note


def _dropped(dropped: Mapping[str, int]) -> str:
    """``rejected: a`` / ``rejected: b`` entries grouped as ``rejected 3 (a 1, b 2)``."""
    rej = {k.split(": ", 1)[1]: v for k, v in dropped.items() if k.startswith("rejected: ") and v}
    rest = {k: v for k, v in dropped.items() if not k.startswith("rejected: ")}
    head = [f"rejected {_v(sum(rej.values()))} ({_v(rej)})"] if rej else []
    return ", ".join(head + ([_v(rest)] if any(rest.values()) else [])) or "-"


def _funnel(card: Mapping[str, Any]) -> str:
    rows = [(s["stage"], s["step"], s["in"], s["out"], _dropped(s["dropped"])) for s in card["funnel"]]
    out = md_table(["stage", "step", "in", "out", "dropped (why)"], rows) + "\n\nEvery row: in = out + dropped."
    for s in card["funnel"]:
        if s.get("selected_because"):
            out += f" Selected because ({s['stage']}): {_v(s['selected_because'])}."
    return out


def _dedupe(card: Mapping[str, Any]) -> str:
    d = card["dedupe"]
    out = md_table(["setting", "value"], list(d["settings"].items()))
    out += "\n\n" + md_table(["result", "value"], [(k.replace("_", " "), v) for k, v in d["results"].items()])
    comps = d["largest_components"]
    if comps:
        rows = [(str(c["component"]), c["size"], f"`{c['weakest_uri'] or c['weakest_uid']}`",
                 f"`{c['partner_uri'] or c['partner_uid']}`" if c["partner_uid"] else "-", c["score"])
                for c in comps]  # fmt: skip
        out += ("\n\nLargest copy components, each with its weakest link (the member whose best partner scores "
                "lowest):\n\n" + md_table(["component", "images", "weakest member", "its best partner", "score"],
                                          rows))  # fmt: skip
    else:
        out += "\n\nNo copy component has more than one image."
    return out


def _decontam(card: Mapping[str, Any]) -> str:
    dc = card["decontamination"]
    if not dc["reference_sets"]:
        return "No reference set (`dedupe.references` is empty): nothing was checked for contamination."
    rows = [(r["name"], r["sources"], r["threshold"], r["images"], r["matches"], r["pool_images_matched"])
            for r in dc["reference_sets"]]  # fmt: skip
    base = any(r.get("base_runs") for r in dc["reference_sets"])
    note = (
        " In an increment the base runs are the reference set `base` (its sources are the base runs): a new image "
        "copying a base image is dropped with its component, counted as contaminated."
        if base
        else ""
    )
    return (
        f"Matches: {_v(dc['matches'])}; pool images dropped as contaminated: {_v(dc['contaminated_dropped'])} "
        "(every image of a component touching a reference image)."
        + note
        + "\n\n"
        + md_table(["reference set", "sources", "threshold", "images", "matches", "pool images matched"], rows)
    )


def _clusters(card: Mapping[str, Any]) -> str:
    c = card["clusters"]
    head = f"Levels: {' / '.join(str(n) for n in c['levels'])} clusters; balanced sample: " + (
        f"{_v(c['balanced_sample'])} images ({c['strategy']})." if c["balanced_sample"] else "none."
    )
    rows = [(name, s["clusters"], s["non_empty"], s["images"], s["smallest"], s["median"], s["largest"],
             s["largest_to_smallest"]) for name, s in (("before balancing", c["level1_before"]),
                                                      ("after (balanced sample)", c["level1_after"])) if s]  # fmt: skip
    header = ["level 1", "clusters", "non-empty", "images", "smallest", "median", "largest", "largest/smallest"]
    return head + "\n\n" + md_table(header, rows)


def _retrieval(card: Mapping[str, Any]) -> str:
    r = card["retrieval"]
    rows = [(s["name"], s["method"], s["rule"], s["sources"], s["seed_images"], s["pairs"], s["retrieved"],
             s["collided"]) for s in r["seed_sets"]]  # fmt: skip
    header = ["seed set", "method", "rule", "sources", "seeds", "pairs", "images retrieved",
              "retrieved by several seeds"]  # fmt: skip
    return (md_table(header, rows) if rows else "No seed set.") + (
        f"\n\nSelected: {_v(r['selected'])} images ({_v(r['reasons'])}); balanced sample included: "
        f"{_v(r['include_balanced'])}.")  # fmt: skip


def _shards(card: Mapping[str, Any]) -> str:
    s = card["shards"]
    order = f"shuffled under seed {s['seed']}" if s["shuffle"] else "uid order"
    head = (f"`{s['pattern']}`: {_v(s['count'])} samples ({_v(s['labelled'])} with a label, from "
            f"`{s['label_from']}`), {_size(s['bytes'])}; cut from `{s['selection']}`, {order}, at most "
            f"{_v(s['samples_per_shard'])} samples per shard.")  # fmt: skip
    if s.get("new_shards") is not None:
        head += (
            f" With the base runs' shards (numbering continues): {_v(s['new_shards'])} shards and "
            f"{_v(s['new_count'])} samples are new in this run."
        )
    runs = any(x.get("run") for x in s["shards"])
    header = ["shard", "samples", "bytes", "sha256"] + (["run"] if runs else [])
    rows = [[x["name"], x["count"], x["bytes"], f"`{x['sha256']}`"] + ([x.get("run")] if runs else [])
            for x in s["shards"]]  # fmt: skip
    return head + "\n\n" + md_table(header, rows)


def _provenance(card: Mapping[str, Any]) -> str:
    run = card["run"]
    rows = [(s, f"`{r['code_version']}`", f"`{r['config_hash']}`", r["seconds"]) for s, r in run["stages_ran"].items()]
    out = md_table(["stage", "code version", "config hash", "seconds"], rows)
    out += f"\n\nReport drawn by code version `{run['report_code_version']}`."
    chain = card["increment"]["chain"]
    if chain:
        brows = [(f"`{b['run_dir']}`", b.get("name"), b.get("code_version"), b.get("images"), b.get("shards"),
                  b.get("samples"), b.get("error")) for b in chain]  # fmt: skip
        out += "\n\nBase runs, oldest first:\n\n" + md_table(
            ["run", "name", "code version", "images", "shards", "samples", "problem"], brows
        )
    return out


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as Markdown (sections of the stages that ran)."""
    parts = [f"# Dataset card: {card['run']['name']}", _summary(card), "## Run", _run(card)]
    if card.get("sources"):
        parts += ["## Sources", _sources(card)]
    parts += ["## Funnel", _funnel(card)]
    if card.get("dedupe"):
        parts += ["## Copy detection (dedupe)", _dedupe(card), "## Decontamination", _decontam(card)]
    if card.get("clusters"):
        parts += ["## Cluster balance", _clusters(card)]
    if card.get("retrieval"):
        parts += ["## Seed sets and retrieval", _retrieval(card)]
    if card.get("shards"):
        parts += ["## Shards", _shards(card)]
    parts += ["## Provenance", _provenance(card)]
    return "\n\n".join(parts) + "\n"


def write_card(card: Mapping[str, Any], out_dir: str) -> list[str]:
    """Write ``dataset_card.json`` and ``DATASET_CARD.md`` into ``out_dir``; return their names."""
    atomic_write_bytes(join(out_dir, CARD_JSON), (json.dumps(card, indent=2) + "\n").encode())
    atomic_write_bytes(join(out_dir, CARD_MD), card_markdown(card).encode())
    return [CARD_MD, CARD_JSON]
