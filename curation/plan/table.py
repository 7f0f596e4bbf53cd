"""The throughput table behind ``python -m curation plan``: ``curation/plan/throughput.toml``.

Every section that holds numbers names the command that measured them (``command``) and the machine it ran on
(``machine``); a section of estimates says ``measured = false`` and its ``basis`` (how the numbers were derived),
until a run on that hardware replaces them. :func:`load_table` checks this, so a number without provenance cannot
enter the table. Figures are looked up by dotted name (``table.value("dedupe.verify_s_per_pair")``) and every
lookup of a figure that was not measured is remembered, so the plan can say which of its rows rest on estimates.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["Figure", "ThroughputTable", "load_table", "table_from_dict"]

log = logging.getLogger(__name__)

#: Keys of a section that describe it rather than hold figures.
META_KEYS = ("command", "machine", "measured", "basis", "note")


@dataclass(frozen=True)
class Figure:
    """One number of the table with its provenance."""

    value: float
    command: str
    machine: str
    measured: bool
    basis: str = ""


@dataclass
class ThroughputTable:
    """Figures by dotted name (``section.key`` or ``section.sub.key``) and the sections' raw mappings."""

    figures: dict[str, Figure]
    sections: dict[str, dict[str, Any]]
    source: str = ""
    used_estimates: set[str] = field(default_factory=set)
    """Dotted names of the figures read so far that were not measured (``measured = false`` sections)."""

    def figure(self, name: str) -> Figure:
        fig = self.figures.get(name)
        if fig is None:
            raise ValueError(f"the throughput table {self.source} has no figure {name!r}: measure it with "
                             "bench/plan_calibrate.py and add it")  # fmt: skip
        if not fig.measured:
            self.used_estimates.add(name)
        return fig

    def value(self, name: str) -> float:
        """The number ``name`` (``ValueError`` naming it when the table lacks it)."""
        return self.figure(name).value

    def has(self, name: str) -> bool:
        return name in self.figures

    def section(self, name: str) -> dict[str, Any]:
        """A section's raw mapping (nested tables included), e.g. ``instances``."""
        node: Any = self.sections
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"the throughput table {self.source} has no section [{name}]")
            node = node[part]
        return node


def _walk(node: dict[str, Any], prefix: str, inherited: dict[str, Any], out: dict[str, Figure], where: str) -> None:
    meta = {**inherited, **{k: node[k] for k in META_KEYS if k in node}}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else key
        if key in META_KEYS:
            continue
        if isinstance(value, dict):
            _walk(value, name, meta, out, where)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: {name} must be a number, got {value!r}")
        else:
            command, machine = meta.get("command"), meta.get("machine")
            if not isinstance(command, str) or not command or not isinstance(machine, str) or not machine:
                raise ValueError(f"{where}: {name} has no command and machine: every number must name the bench "
                                 "command that measured it and the machine (set them in its section)")  # fmt: skip
            measured = meta.get("measured", True)
            if not isinstance(measured, bool):
                raise ValueError(f"{where}: measured must be true or false in the section of {name}")
            if not measured and not meta.get("basis"):
                raise ValueError(f"{where}: {name} is not measured, so its section must say how it was estimated "
                                 "(basis)")  # fmt: skip
            if value < 0:
                raise ValueError(f"{where}: {name} must be >= 0, got {value}")
            out[name] = Figure(float(value), command, machine, measured, str(meta.get("basis", "")))


def load_table(path: str | None = None) -> ThroughputTable:
    """Read and check the throughput table (default: the one kept in the package)."""
    if path is None:
        return table_from_dict(tomllib.loads((files("curation.plan") / "throughput.toml").read_text()),
                               "curation/plan/throughput.toml")  # fmt: skip
    with open(path, "rb") as f:
        return table_from_dict(tomllib.load(f), path)


def table_from_dict(data: dict[str, Any], source: str = "<dict>") -> ThroughputTable:
    """Check a parsed table (every number with its command and machine) and index its figures."""
    figures: dict[str, Figure] = {}
    numbers = {k: v for k, v in data.items() if k != "instances"}  # node shapes: specifications, not measurements
    _walk(numbers, "", {}, figures, source)
    instances = data.get("instances", {})
    if instances and not instances.get("source"):
        raise ValueError(f"{source}: [instances] must name its source (the vendor's specifications)")
    for name, spec in instances.items():
        if name == "source":
            continue
        if not isinstance(spec, dict) or not {"cpus", "gpus", "memory_gb"} <= set(spec):
            raise ValueError(f"{source}: instances.{name} needs cpus, gpus and memory_gb")
    log.debug("throughput table %s: %d figures", source, len(figures))
    return ThroughputTable(figures=figures, sections=data, source=source)
