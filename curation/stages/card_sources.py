"""Per-source counts of the dataset card: which ``ingest.sources`` entry every file came from, and how far its
images got (kept by dedupe, selected for the shards).

Ingest does not record the source of an occurrence, so it is matched back by pattern (:class:`SourceMatcher`,
built from the source strings alone, no listing): an occurrence (a file, or a tar member by its tar) belongs to
the first entry of ``ingest.sources``, in order, that names it: the file or tar itself, a directory above it, or a
glob matching it. An occurrence no pattern names came from a Parquet list of URIs (whose URIs can be anywhere);
with several such lists they share one row. An image found in several sources counts under each of them.

Per-part tasks (the memory contract of :mod:`curation.stages.report_data`): one per ``occurrences/part-N`` (files
read, rejected by reason) and one per ``manifest/part-N`` (images, with ``dedup/part-N`` and the selection rows
in the part's uid range: the selection parts are located by their first and last uid, one task per part).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.io.artifacts import DEDUP_DIR
from curation.io.fs import expand_braces, full_url, get_fs, join, read_parquet
from curation.io.parts import part_name
from curation.stages.base import Executor

__all__ = ["SourceMatcher", "image_counts", "occurrence_counts", "source_matcher", "uid_spans"]

_GLOB = re.compile(r"\*\*|\*|\?|\[[^\]]*\]")
_LIST_EXT = ".parquet"


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex: ``*`` and ``?`` stay inside one path segment, ``**`` crosses segments."""
    out, pos = [], 0
    for m in _GLOB.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        tok = m.group(0)
        out.append(".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else
                   "[" + tok[1:-1].replace("!", "^", 1) + "]")  # fmt: skip
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out))


@dataclass
class SourceMatcher:
    """The ``ingest.sources`` entries as lookups: exact paths, directories above a path, globs."""

    labels: list[str]
    """One row label per source entry, then (when some entry is a URI list) the URI-list row."""
    kinds: list[str]
    exact: dict[str, int] = field(default_factory=dict)
    globs: list[tuple[re.Pattern[str], int]] = field(default_factory=list)
    fallback: int | None = None
    """Row of occurrences no pattern names (the URI lists), None without URI lists."""

    def match(self, key: str) -> int | None:
        """Row of the file or tar ``key`` (a full URL as ingest records it)."""
        found = [self.exact[key]] if key in self.exact else []
        parent = key
        while "/" in parent.rstrip("/"):
            parent = parent.rstrip("/").rsplit("/", 1)[0]
            if parent in self.exact:
                found.append(self.exact[parent])
        found += [i for rx, i in self.globs if rx.fullmatch(key)]
        return min(found) if found else self.fallback

    def match_uri(self, uri: str) -> int | None:
        """Row of a manifest URI: a file, or ``<tar>#<member>`` (matched by its tar)."""
        if uri in self.exact or "#" not in uri:
            return self.match(uri)
        return self.match(uri.rsplit("#", 1)[0])


def source_matcher(sources: Sequence[str]) -> SourceMatcher:
    """A matcher of ``sources`` (``ingest.sources``), normalised like ingest lists them."""
    m = SourceMatcher(list(sources), [])
    lists: list[str] = []
    for i, source in enumerate(sources):
        urls, globbed = [], False
        for pattern in expand_braces(source):
            fs, path = get_fs(pattern)
            url = full_url(fs, path.rstrip("/") or path)
            urls.append(url)
            if url.endswith(_LIST_EXT):
                continue
            if _GLOB.search(path):
                globbed = True
                m.globs.append((_glob_regex(url), i))
            else:
                m.exact.setdefault(url, i)  # a file, a tar or a directory
        if any(u.endswith(_LIST_EXT) for u in urls):
            lists.append(source)
            m.kinds.append("URI list")
        elif globbed:
            m.kinds.append("glob")
        elif all(u.endswith(".tar") for u in urls):
            m.kinds.append("tar shards" if len(urls) > 1 else "tar shard")
        else:
            fs, path = get_fs(urls[0])
            m.kinds.append("directory" if fs.isdir(path) else "files")
    if len(lists) == 1:
        m.fallback = m.labels.index(lists[0])
    elif lists:
        m.labels.append("URI lists: " + ", ".join(lists))
        m.kinds.append("URI lists")
        m.fallback = len(m.labels) - 1
    return m


def _occurrences_part(run_dir: str, matcher: SourceMatcher, index: int) -> dict[str, Any]:
    t = read_parquet(join(run_dir, "occurrences", part_name(index)), columns=["uri", "container", "status", "reason"])
    read: Counter[int] = Counter()
    members: Counter[int] = Counter()
    tars: dict[int, set[str]] = {}
    rejected: dict[int, Counter[str]] = {}
    for uri, container, status, reason in zip(*(t[c].to_pylist() for c in ("uri", "container", "status", "reason"))):
        row = matcher.match(container or uri)
        row = -1 if row is None else row
        read[row] += 1
        if container:
            members[row] += 1
            tars.setdefault(row, set()).add(container)
        if status == "rejected":
            rejected.setdefault(row, Counter())[reason or "unknown"] += 1
    return {"part": index, "read": dict(read), "members": dict(members), "tars": {k: len(v) for k, v in tars.items()},
            "rejected": {k: dict(v) for k, v in rejected.items()}}  # fmt: skip


def occurrence_counts(executor: Executor, run_dir: str, n_parts: int, matcher: SourceMatcher
                      ) -> dict[int, dict[str, Any]]:  # fmt: skip
    """``{row: {"read": n, "tar_members": n, "tars": n, "rejected": {reason: n}}}`` over ``occurrences/part-*``
    (row -1: matched nothing). A tar is scanned by one part, so its count per part adds up."""
    out: dict[int, dict[str, Any]] = {}
    for r in executor.map(partial(_occurrences_part, run_dir, matcher), list(range(n_parts)), desc="card:sources"):
        for row, n in r["read"].items():
            o = out.setdefault(int(row), {"read": 0, "tar_members": 0, "tars": 0, "rejected": Counter()})
            o["read"] += n
            o["tar_members"] += r["members"].get(row, 0)
            o["tars"] += r["tars"].get(row, 0)
        for row, reasons in r["rejected"].items():
            out[int(row)]["rejected"].update(reasons)
    return {k: {**v, "rejected": dict(sorted(v["rejected"].items()))} for k, v in out.items()}


def _span_part(urls: Sequence[str], index: int) -> dict[str, Any]:
    uids = pc.drop_null(read_parquet(urls[index], columns=["uid"])["uid"])
    mm = pc.min_max(uids)
    return {"part": index, "span": [mm["min"].as_py(), mm["max"].as_py()] if len(uids) else None}


def uid_spans(executor: Executor, urls: Sequence[str]) -> list[tuple[str, str] | None]:
    """First and last uid of every part in ``urls`` (None for an empty part)."""
    spans: list[tuple[str, str] | None] = [None] * len(urls)
    for r in executor.map(partial(_span_part, list(urls)), list(range(len(urls))), desc="card:spans"):
        spans[int(r["part"])] = tuple(r["span"]) if r["span"] else None  # type: ignore[assignment]
    return spans


def _selected_in(urls: Sequence[str], spans: Sequence[tuple[str, str] | None], lo: str, hi: str) -> set[str]:
    """Selected uids in ``[lo, hi]`` from the selection parts whose span overlaps it."""
    out: set[str] = set()
    for url, span in zip(urls, spans):
        if span is None or span[1] < lo or span[0] > hi:
            continue
        fs, path = get_fs(url)
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["uid"], filters=[("uid", ">=", lo), ("uid", "<=", hi)])
        out.update(t["uid"].to_pylist())
    return out


def _images_part(run_dir: str, matcher: SourceMatcher, select: Sequence[str] | None,
                 spans: Sequence[tuple[str, str] | None], index: int) -> dict[str, Any]:  # fmt: skip
    m = read_parquet(join(run_dir, "manifest", part_name(index)), columns=["uid", "uris"])
    d = read_parquet(join(run_dir, DEDUP_DIR, part_name(index)), columns=["uid", "keep", "contaminated"])
    fate = {u: "kept" if k else "contaminated" if c else "duplicate"
            for u, k, c in zip(*(d[x].to_pylist() for x in ("uid", "keep", "contaminated")))}  # fmt: skip
    uids = m["uid"].to_pylist()
    if select is None:  # shards hold every kept image
        chosen = {u for u, f in fate.items() if f == "kept"}
    else:
        chosen = _selected_in(select, spans, min(uids), max(uids)) if uids else set()
    counts: dict[int, Counter[str]] = {}
    for uid, uris in zip(uids, m["uris"].to_pylist()):
        rows = {matcher.match_uri(u) for u in uris or []}
        for row in {-1 if r is None else r for r in rows}:
            c = counts.setdefault(row, Counter())
            c["images"] += 1
            c[fate.get(uid, "not embedded")] += 1
            c["selected"] += uid in chosen
    return {"part": index, "counts": {k: dict(v) for k, v in counts.items()}}


def image_counts(executor: Executor, run_dir: str, n_parts: int, matcher: SourceMatcher,
                 select: Sequence[str] | None) -> dict[int, dict[str, int]]:  # fmt: skip
    """``{row: {"images", "not embedded", "duplicate", "contaminated", "kept", "selected"}}`` over the manifest
    parts; ``select``: the parts of the selection the shards were cut from (None: every kept image)."""
    spans = uid_spans(executor, select) if select else []
    keys = ("images", "not embedded", "duplicate", "contaminated", "kept", "selected")
    out: dict[int, Counter[str]] = {}
    fn = partial(_images_part, run_dir, matcher, list(select) if select is not None else None, spans)
    for r in executor.map(fn, list(range(n_parts)), desc="card:images"):
        for row, c in r["counts"].items():
            out.setdefault(int(row), Counter()).update(c)
    return {k: {x: int(v[x]) for x in keys} for k, v in out.items()}
