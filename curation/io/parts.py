"""Part files and completion markers: the resume protocol of every stage.

A stage writes ``<dir>/part-NNNNN.parquet`` files atomically. After a part's data is in place its marker
``_work/<stage>/<step>/part-NNNNN.json`` (the part's stats and config hash) is written; a part counts as done only
once its marker exists. When all parts are done the stage writes ``<dir>/_SUCCESS.json`` last. A rerun skips a
stage whose success file matches its config hash and, inside a stage, every part with a marker.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from curation.io.fs import get_fs, join, read_json, write_json

__all__ = ["PartStore", "code_version", "part_name"]

_PART_RE = re.compile(r"part-(\d{5,})\.json$")


def part_name(index: int, ext: str = "parquet") -> str:
    """``part-00012.parquet``."""
    return f"part-{index:05d}.{ext}"


@lru_cache(maxsize=1)
def code_version() -> str:
    """Git commit of the code (``+dirty`` when modified), or the package version outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("dinoforge")
        except PackageNotFoundError:
            return "unknown"


class PartStore:
    """Markers and success file of one stage in a run directory (``prefix`` nests reference sets)."""

    def __init__(self, run_dir: str, stage: str, output: str, prefix: str = "") -> None:
        self.run_dir = run_dir
        self.stage = stage
        self.root = join(run_dir, prefix) if prefix else run_dir
        self.output = join(self.root, output)
        self.work = join(self.root, "_work", stage)

    def data_url(self, subdir: str, index: int) -> str:
        return join(self.root, subdir, part_name(index))

    def marker_url(self, step: str, index: int) -> str:
        return join(self.work, step, part_name(index, "json"))

    def done(self, step: str, config_hash: str) -> dict[int, dict[str, Any]]:
        """Markers of finished parts of ``step``; raises if one was made under another config."""
        fs, path = get_fs(join(self.work, step))
        if not fs.exists(path):
            return {}
        out: dict[int, dict[str, Any]] = {}
        for p in sorted(fs.ls(path, detail=False)):
            m = _PART_RE.search(p)
            if not m:
                continue
            marker = read_json(join(self.work, step, part_name(int(m.group(1)), "json")))
            if marker is None:
                continue
            self._check_hash(marker, config_hash, f"{self.work}/{step}")
            out[int(m.group(1))] = marker
        return out

    def mark_done(self, step: str, index: int, stats: dict[str, Any], config_hash: str) -> None:
        write_json(self.marker_url(step, index), {**stats, "part": index, "config_hash": config_hash})

    def drop_data(self) -> None:
        """Delete the step data under ``work`` (everything but the markers): a finished stage's intermediates.
        Every step stays skipped on a rerun, so the driver must read nothing but markers and outputs after it."""
        fs, path = get_fs(self.work)
        if fs.exists(path):
            for f in fs.find(path):
                if not f.endswith(".json"):
                    fs.rm(f)

    @property
    def success_url(self) -> str:
        return join(self.output, "_SUCCESS.json")

    def success(self, config_hash: str) -> dict[str, Any] | None:
        """The stage's success record when it finished under ``config_hash``."""
        rec = read_json(self.success_url)
        if rec is not None:
            self._check_hash(rec, config_hash, self.success_url)
        return rec

    def write_success(self, record: dict[str, Any]) -> None:
        write_json(self.success_url, record)

    def _check_hash(self, rec: dict[str, Any], config_hash: str, where: str) -> None:
        if rec.get("config_hash") != config_hash:
            raise ValueError(
                f"{where} was produced by stage {self.stage!r} with another configuration "
                f"(hash {rec.get('config_hash')} != {config_hash}); use a new --out run directory or restore "
                "the original settings to resume"
            )
