"""``python -m curation``: run a recipe, run one stage, ask for an image's lineage, or plan a run's cost."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from curation.config import RunConfig
from curation.plan.cli import add_plan_parser, plan_output
from pretrain.utils.config import load_config

__all__ = ["lineage_cmd", "load_run_config", "main", "run_cmd", "stage_cmd", "stage_status"]

log = logging.getLogger("curation")


def load_run_config(recipe: str | None, overrides: Sequence[str], address: str | None = None,
                    base: str | None = None) -> RunConfig:  # fmt: skip
    """Load ``recipe`` (path or fsspec URL, or a built-in recipe name) with ``--set`` overrides (and ``--base``:
    the run is an increment of that run directory)."""
    if recipe and "/" not in recipe and not recipe.endswith(".toml"):
        from importlib.resources import files

        recipe = str(files("curation") / "recipes" / f"{recipe}.toml")
    overrides = list(overrides) + ([f'ray.address="{address}"'] if address is not None else [])
    overrides += [f"base={json.dumps(base)}"] if base else []
    return load_config(RunConfig, recipe, overrides)


def _execute(config: RunConfig, out: str, names: list[str]) -> dict[str, Any]:
    from curation.ray import executor_for
    from curation.stages import run_stages

    with executor_for(config.ray) as executor:
        records = run_stages(config, out, executor, names)
    summary = {}
    for name, rec in records.items():
        status = stage_status(rec)
        log.info("%s: %s: in=%s out=%s rejected=%s (%ss%s)", name, status, rec.get("in"), rec.get("out"),
                 rec.get("rejected"), rec.get("seconds"), ", earlier" if rec.get("skipped") else "")  # fmt: skip
        summary[name] = {"status": status, **rec}
    return summary


def stage_status(rec: dict[str, Any]) -> str:
    """What this invocation did for a stage, from the record ``Stage.execute`` returned: ``ran``, ``resumed (N of
    M parts skipped)`` (parts finished by an earlier, interrupted invocation) or ``already finished``."""
    if rec.get("skipped"):
        return "already finished"
    skipped, parts = int(rec.get("parts_skipped") or 0), int(rec.get("parts") or 0)
    return f"resumed ({skipped} of {parts} parts skipped)" if skipped else "ran"


def run_cmd(recipe: str, out: str, overrides: Sequence[str] = (), address: str | None = None,
            base: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run every stage of RECIPE in order into the run directory OUT (any fsspec URL); finished stages and
    parts are skipped, so rerunning a killed run resumes it. Each stage's record says what this invocation did
    (``status``: ran, resumed (N of M parts skipped), already finished)."""
    config = load_run_config(recipe, overrides, address, base)
    return _execute(config, out, list(config.stages))


def stage_cmd(name: str, recipe: str, out: str, overrides: Sequence[str] = (), address: str | None = None) -> dict:
    """Run the single stage NAME of RECIPE into OUT (its inputs must be finished there)."""
    config = load_run_config(recipe, overrides, address)
    return _execute(config, out, [name])


def lineage_cmd(run_dir: str, uri: str) -> dict[str, Any]:
    """Where did source URI go in RUN_DIR: uid, rejected (why), component, kept."""
    from curation.io.lineage import lineage

    return lineage(run_dir, uri)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m curation", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="TOML recipe (path, fsspec URL or built-in name such as 'default')")
        sp.add_argument("--out", required=True, help="run directory (local path or fsspec URL)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                        help="override a recipe field (repeatable), e.g. --set dedupe.threshold=0.5")  # fmt: skip
        sp.add_argument("--address", default=None,
                        help="Ray address: 'auto', 'ray://host:10001', 'none' (no Ray); default: the job's cluster "
                        "inside `ray job submit`, else an in-process Ray")  # fmt: skip

    run = sub.add_parser("run", help=run_cmd.__doc__, description=run_cmd.__doc__)
    common(run)
    run.add_argument("--base", default=None, metavar="BASE_RUN",
                     help="make this run an increment of the finished run BASE_RUN (read-only): only the new sources "
                     "are ingested and embedded, and compared with every image of BASE_RUN's chain")  # fmt: skip
    stage = sub.add_parser("stage", help=stage_cmd.__doc__, description=stage_cmd.__doc__)
    stage.add_argument("name", help="stage name (ingest, embed, dedupe, ...)")
    common(stage)
    lin = sub.add_parser("lineage", help=lineage_cmd.__doc__, description=lineage_cmd.__doc__)
    lin.add_argument("run_dir")
    lin.add_argument("uri")
    add_plan_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines print ModuleNotFoundError
    try:
        if args.cmd == "run":
            result = run_cmd(args.recipe, args.out, args.overrides, args.address, args.base)
        elif args.cmd == "stage":
            result = stage_cmd(args.name, args.recipe, args.out, args.overrides, args.address)
        elif args.cmd == "plan":
            print(plan_output(args))
            return 0
        else:
            result = lineage_cmd(args.run_dir, args.uri)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0
