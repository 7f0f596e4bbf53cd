"""What a run tells its user: the per-stage summary of a resumed run, and a quiet stderr."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile

from curation.cli import main

from .conftest import REPO, stop_processes, write_copy_corpus


def test_resumed_run_says_what_ran_now(tmp_path, capsys, caplog):
    write_copy_corpus(tmp_path / "src", originals=3, copies=1, seed=1)  # 5 images
    run = tmp_path / "run"
    common = ["--out", str(run), "--address", "none", "--set", f'ingest.sources=["{tmp_path / "src"}"]',
              "--set", "ingest.rows_per_part=2"]  # fmt: skip
    caplog.set_level(logging.INFO, logger="curation")
    assert main(["stage", "ingest", "default", *common]) == 0
    assert json.loads(capsys.readouterr().out)["ingest"]["status"] == "ran"

    assert main(["run", "default", *common]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["ingest"]["status"] == "already finished" and first["ingest"]["skipped"] is True
    assert first["embed"]["status"] == first["dedupe"]["status"] == "ran"
    assert "skipped" not in first["embed"] and first["embed"]["parts"] == 3
    assert "ingest: already finished: in=5 out=5" in caplog.text and "embed: ran: in=5 out=5" in caplog.text
    assert "skipped" not in json.loads((run / "manifest" / "_SUCCESS.json").read_text())  # only in what is returned

    # an embed interrupted after two of its three parts: its success file and the last part's marker are missing
    (run / "embeddings" / "_SUCCESS.json").unlink()
    (run / "_work" / "embed" / "embed" / "part-00002.json").unlink()
    caplog.clear()
    assert main(["run", "default", *common]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["ingest"]["status"] == again["dedupe"]["status"] == "already finished"
    assert again["embed"]["status"] == "resumed (2 of 3 parts skipped)" and again["embed"]["parts_computed"] == 1
    assert "embed: resumed (2 of 3 parts skipped): in=5 out=5" in caplog.text
    assert re.search(r"dedupe: already finished: .*s, earlier\)", caplog.text)


def test_small_run_prints_no_error_line(tmp_path):
    """A plain run on an in-process Ray: stderr has no error-level line (Python logging or Ray's C++ log)."""
    write_copy_corpus(tmp_path / "src", originals=3, copies=0, seed=3)
    ray_tmp = tempfile.mkdtemp(prefix="rlog-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "curation", "run", "default", "--out", str(tmp_path / "run"),
           "--set", f'ingest.sources=["{tmp_path / "src"}"]', "--set", "ray.num_cpus=2"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop_processes([ray_tmp])
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting an in-process Ray" in proc.stderr and "embed: ran" in proc.stderr
    errors = [line for line in proc.stderr.splitlines()
              if re.search(r"\bERROR\b|\bTraceback\b|^\[[^\]]* E \d+ \d+\]", line)]  # fmt: skip
    assert not errors, "\n".join(errors)
