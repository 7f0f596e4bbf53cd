"""List ingest sources into deterministic work units, and read image bytes back by location.

Sources are directories (searched recursively for images and ``.tar`` shards), globs and brace patterns, single
files, ``.tar``/WebDataset shards (streamed, never extracted) and ``.parquet`` files with a column of URIs, on
any fsspec filesystem. Tar members are addressed as ``<tar uri>#<member name>``; the name is data, never a path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from curation.io.fs import expand_braces, full_url, get_fs, read_parquet

__all__ = ["IngestUnit", "extension", "list_sources", "member_uri", "plan_units", "read_location"]

log = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class IngestUnit:
    """One ingest task: a list of loose file URIs or one tar shard."""

    kind: str
    """``files`` or ``tar``."""
    uris: tuple[str, ...]
    """File URIs (``files``) or the single tar URI (``tar``)."""


def member_uri(tar_uri: str, name: str) -> str:
    """The URI recorded for a tar member."""
    return f"{tar_uri}#{name}"


def extension(path: str) -> str:
    """Lower-case extension of the last path segment (``""`` if none)."""
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def list_sources(sources: list[str], extensions: list[str], uri_column: str) -> tuple[list[str], list[str]]:
    """Expand sources into sorted, de-duplicated ``(image file URIs, tar URIs)``.

    Raises ``ValueError`` naming the source when it matches nothing.
    """
    files: set[str] = set()
    tars: set[str] = set()
    exts = set(extensions)
    for source in sources:
        found = 0
        for pattern in expand_braces(source):
            fs, path = get_fs(pattern)
            if _GLOB_CHARS.intersection(path):
                paths = sorted(fs.glob(path))
                explicit = True
            elif fs.isdir(path):
                paths = sorted(fs.find(path))
                explicit = False
            elif fs.exists(path):
                paths = [path]
                explicit = True
            else:
                paths = []
            for p in paths:
                if fs.isdir(p):
                    continue
                ext, url = extension(p), full_url(fs, p)
                if ext == "tar":
                    tars.add(url)
                elif ext == "parquet" and explicit:
                    table = read_parquet(url)
                    if uri_column not in table.column_names:
                        raise ValueError(
                            f"ingest.sources: {url} has no column {uri_column!r} (set ingest.uri_column; "
                            f"columns: {table.column_names})"
                        )
                    files.update(u for u in table.column(uri_column).to_pylist() if u)
                elif ext in exts or explicit:
                    files.add(url)
                else:
                    continue
                found += 1
        if not found:
            raise ValueError(f"ingest.sources: {source!r} matched no image, tar or parquet file")
    return sorted(files), sorted(tars)


def plan_units(sources: list[str], extensions: list[str], uri_column: str, files_per_part: int) -> list[IngestUnit]:
    """Deterministic work units: chunks of ``files_per_part`` loose files, then one unit per tar shard."""
    files, tars = list_sources(sources, extensions, uri_column)
    units = [IngestUnit("files", tuple(files[i : i + files_per_part])) for i in range(0, len(files), files_per_part)]
    units += [IngestUnit("tar", (t,)) for t in tars]
    log.info("ingest plan: %d files in %d parts, %d tar shards", len(files), len(units) - len(tars), len(tars))
    return units


def read_location(uri: str, container: str | None, offset: int, size: int) -> bytes:
    """Bytes of an image: a whole file, or ``size`` bytes at ``offset`` inside the tar ``container``."""
    if container:
        from curation.io.tar_stream import read_member

        return read_member(container, offset, size)
    fs, path = get_fs(uri)
    return fs.cat_file(path)

