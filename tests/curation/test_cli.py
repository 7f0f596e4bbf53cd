"""``python -m curation``: run / stage / lineage subcommands, overrides, saved config, errors, every recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from curation.cli import main
from curation.config import RunConfig
from pretrain.utils.config import load_config

from .conftest import REPO, write_copy_corpus


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_run_stage_and_lineage_commands(tmp_path, capsys):
    truth = write_copy_corpus(tmp_path / "src", originals=3, copies=1, seed=1)
    out = str(tmp_path / "run")
    common = ["--out", out, "--address", "none", "--set", f'ingest.sources=["{tmp_path / "src"}"]',
              "--set", "ingest.rows_per_part=2"]  # fmt: skip
    assert main(["stage", "dedupe", "default", *common]) == 2
    assert "needs stage 'embed' finished first" in capsys.readouterr().err
    assert main(["stage", "ingest", "default", *common]) == 0
    assert _json(capsys)["ingest"]["out"] == len(truth) == 5
    assert main(["run", "default", *common]) == 0
    records = _json(capsys)
    assert records["ingest"]["parts_computed"] == records["ingest"]["parts"]  # the record of the first invocation
    assert records["embed"]["out"] == 5 and records["dedupe"]["out"] == 3
    saved = load_config(RunConfig, f"{out}/config.toml")
    assert saved.ingest.sources == [str(tmp_path / "src")] and saved.ingest.rows_per_part == 2
    assert saved.ray.address == "none" and saved.dedupe.threshold == 0.42

    copy = next(p for p in truth if "_copy0" in p)
    assert main(["lineage", out, copy]) == 0
    info = _json(capsys)
    assert main(["lineage", out, copy.replace("_copy0", "")]) == 0
    original = _json(capsys)
    assert info["status"] == original["status"] == "ok" and info["component"] == original["component"]
    assert info["kept"] != original["kept"] and info["score"] > 0.42
    assert main(["lineage", out, str(tmp_path / "missing.jpg")]) == 0
    assert _json(capsys)["found"] is False


def test_cli_errors_name_what_to_change(tmp_path, capsys):
    assert main(["run", "default", "--out", str(tmp_path / "r"), "--set", "dedupe.treshold=0.5"]) == 2
    assert "dedupe.treshold" in capsys.readouterr().err
    assert main(["stage", "clusterize", "default", "--out", str(tmp_path / "r"), "--address", "none"]) == 2
    assert "unknown stage 'clusterize'" in capsys.readouterr().err
    assert main(["run", "default", "--out", str(tmp_path / "r"), "--address", "none"]) == 2
    assert "ingest.sources is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run"])


def test_module_entrypoint_help():
    proc = subprocess.run([sys.executable, "-m", "curation", "run", "--help"], cwd=REPO, capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert "Run every stage of RECIPE" in proc.stdout and "--set" in proc.stdout and "--address" in proc.stdout


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "curation" / "recipes").glob("*.toml")))
def test_every_recipe_parses(recipe):
    cfg = load_config(RunConfig, str(REPO / "curation" / "recipes" / recipe))
    assert cfg.stages[:3] == ["ingest", "embed", "dedupe"] and cfg.name
    assert cfg.embed.model != "torchscript" or cfg.embed.weights.endswith(".pt")
