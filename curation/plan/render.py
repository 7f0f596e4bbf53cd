"""A plan as a text table (what ``python -m curation plan`` prints) or as a JSON-able dict (``--json``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from curation.plan.plan import Plan

__all__ = ["fmt_bytes", "fmt_count", "fmt_duration", "plan_dict", "plan_text"]


def fmt_duration(seconds: float) -> str:
    """``12.3 s``, ``45.2 min``, ``12.3 h`` or ``3.41 d``."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} d"


def fmt_count(x: float) -> str:
    """Three significant digits with thousands separators (``1,230,000``), ``-`` for zero."""
    if x == 0:
        return "-"
    if abs(x) < 100:
        return f"{x:.3g}"
    digits = len(str(int(abs(x)))) - 3
    return f"{round(x, -digits):,.0f}"


def fmt_bytes(n: float) -> str:
    """Decimal units: ``512 B``, ``1.5 MB``, ``3.2 TB``."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000.0
    raise AssertionError("unreachable")


def _images(x: float) -> str:
    return f"{x:.3g}" if x >= 1e6 else f"{x:,.0f}"


def plan_text(plan: Plan, steps: bool = False) -> str:
    """The per-stage table and the totals; ``steps`` adds one line per step under its stage."""
    head = ("stage", "images in -> out", "wall", "GPU-h", "CPU-h", "peak RSS/process", "written", "scratch")
    rows = [head]
    for s in plan.stages:
        rows.append((s.name, f"{_images(s.images_in)} -> {_images(s.images_out)}", fmt_duration(s.wall_s),
                     fmt_count(s.gpu_h), fmt_count(s.cpu_h), fmt_bytes(s.rss_mb * 2**20), fmt_bytes(s.written),
                     fmt_bytes(s.scratch) if s.scratch else "-"))  # fmt: skip
        if steps:
            for c in s.steps:
                rows.append((f"  {c.step.name}", f"{c.step.tasks:,} tasks x{c.step.calls}, {c.slots:,} at once",
                             fmt_duration(c.wall_s), fmt_count(c.gpu_h), fmt_count(c.cpu_s / 3600),
                             fmt_bytes(c.step.rss_mb * 2**20), fmt_bytes(c.step.written),
                             fmt_bytes(c.step.scratch) if c.step.scratch else "-"))  # fmt: skip
            rows.append(("  driver and Ray, fixed", "", fmt_duration(s.overhead_s), "", "", "", "", ""))
    rows.append(("total", "", fmt_duration(plan.wall_s), fmt_count(plan.gpu_h), fmt_count(plan.cpu_h),
                 fmt_bytes(max((s.rss_mb for s in plan.stages), default=0) * 2**20),
                 fmt_bytes(sum(s.written for s in plan.stages)),
                 fmt_bytes(max((s.scratch for s in plan.stages), default=0))))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"plan: recipe {plan.recipe} ({' -> '.join(s.name for s in plan.stages)}), {plan.images:,} images",
             f"cluster: {plan.cluster.describe()}",
             "assumed: " + ", ".join(f"{k} {v:g}" for k, v in asdict(plan.assume).items()), ""]  # fmt: skip
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("-" * len(lines[-1]))
    lines.append("")
    lines.append("wall is the sum of the stages (they run one after another); CPU-h are busy CPU time, GPU-h the "
                 "GPUs held by GPU steps; scratch (total: largest stage) is step data deleted when its stage ends")
    if plan.cluster.gpus:
        lines.append(f"the whole cluster held for the run: {fmt_count(plan.allocated_gpu_h)} GPU-hours "
                     f"({plan.cluster.gpus} GPUs), {fmt_count(plan.node_h)} node-hours")  # fmt: skip
    else:
        lines.append(f"the whole cluster held for the run: {fmt_count(plan.node_h)} node-hours")
    if plan.estimates:
        lines.append("not measured (estimates): " + "; ".join(plan.estimates))
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain numbers (seconds, hours, MiB, bytes)."""
    stages = [{"stage": s.name, "images_in": s.images_in, "images_out": s.images_out, "wall_s": s.wall_s,
               "gpu_h": s.gpu_h, "cpu_h": s.cpu_h, "peak_rss_mb": s.rss_mb, "written_bytes": s.written,
               "scratch_bytes": s.scratch, "overhead_s": s.overhead_s,
               "steps": [{"step": c.step.name, "tasks": c.step.tasks, "calls": c.step.calls, "slots": c.slots,
                          "wall_s": c.wall_s, "cpu_s": c.cpu_s, "gpu_h": c.gpu_h, "rss_mb": c.step.rss_mb}
                         for c in s.steps]}
              for s in plan.stages]  # fmt: skip
    return {"recipe": plan.recipe, "images": plan.images, "cluster": plan.cluster.describe(),
            "nodes": plan.cluster.nodes, "cpus": plan.cluster.cpus, "gpus": plan.cluster.gpus,
            "assumed": asdict(plan.assume), "stages": stages,
            "total": {"wall_s": plan.wall_s, "gpu_h": plan.gpu_h, "cpu_h": plan.cpu_h,
                      "allocated_gpu_h": plan.allocated_gpu_h, "node_h": plan.node_h},
            "estimates": plan.estimates, "notes": plan.notes}  # fmt: skip
