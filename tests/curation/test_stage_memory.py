"""Peak-RSS accounting of the stage contract: every part result carries the peak RSS of the process that ran it,
and ``_SUCCESS.json`` records the largest (``worker_peak_rss_mb``, null when no part was computed) and the
driver's (``driver_peak_rss_mb``); on Ray also the number of distinct nodes that ran parts."""

from __future__ import annotations

import os
import resource

from curation.config import RunConfig
from curation.io.fs import read_json
from curation.stages import IngestStage, LocalExecutor
from curation.stages.base import peak_rss_mb, with_peak_rss
from pretrain.utils.config import load_config

from .conftest import write_copy_corpus


def _config(src) -> RunConfig:
    return load_config(
        RunConfig,
        "curation/recipes/default.toml",
        [f'ingest.sources=["{src}"]', "ingest.files_per_part=2", "ingest.rows_per_part=3"],
    )


def test_with_peak_rss_adds_this_process_peak():
    r = with_peak_rss({"part": 3, "in": 1}, node_id="n")
    assert r["part"] == 3 and r["node_id"] == "n"
    assert abs(r["peak_rss_mb"] - resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) < 1.0
    assert with_peak_rss([1, 2]) == [1, 2]  # non-dict results pass through


def test_local_stage_records_peak_rss(tmp_path):
    write_copy_corpus(tmp_path / "src", originals=3, copies=1, seed=1)
    run = str(tmp_path / "run")
    rec = IngestStage(_config(tmp_path / "src"), run).execute(LocalExecutor())
    on_disk = read_json(f"{run}/manifest/_SUCCESS.json")
    assert on_disk["worker_peak_rss_mb"] == rec["worker_peak_rss_mb"]
    assert on_disk["driver_peak_rss_mb"] == rec["driver_peak_rss_mb"]
    # LocalExecutor: the parts ran in this process, so the worker peak is this process's peak at that time.
    assert 20 < rec["worker_peak_rss_mb"] <= rec["driver_peak_rss_mb"] <= peak_rss_mb()
    assert "nodes" not in rec  # only recorded on Ray

    os.remove(f"{run}/manifest/_SUCCESS.json")  # every part has its marker: nothing is computed again
    again = IngestStage(_config(tmp_path / "src"), run).execute(LocalExecutor())
    assert again["parts_computed"] == 0 and again["worker_peak_rss_mb"] is None
    assert again["driver_peak_rss_mb"] > 20


def test_ray_stage_records_worker_peak_and_nodes(ray_session, tmp_path):
    from curation.ray import RayExecutor

    write_copy_corpus(tmp_path / "src", originals=3, copies=1, seed=1)
    run = str(tmp_path / "run")
    rec = IngestStage(_config(tmp_path / "src"), run).execute(RayExecutor())
    assert rec["parts_computed"] == rec["parts"] > 1
    assert 20 < rec["worker_peak_rss_mb"] < 24 * 1024  # a Ray worker process, not this one
    assert 20 < rec["driver_peak_rss_mb"] <= peak_rss_mb()
    assert rec["nodes"] == 1  # the in-process Ray is one node
    markers = read_json(f"{run}/_work/ingest/scan/part-00000.json")
    assert "peak_rss_mb" not in markers  # measurement is added by the executor, not written by the part
