"""bench/curation_scale.py --distributed writes synthetic run directories (manifest + embeddings parts with the
ingest/embed success records); the dedupe stage runs on one and finds the planted copies."""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pyarrow.parquet as pq

from curation import schemas
from curation.cli import load_run_config
from curation.stages import LocalExecutor, run_stages

from .conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_curation_scale", REPO / "bench" / "curation_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_synthetic_run_dedupes_with_local_executor(tmp_path):
    bench = _bench()
    args = argparse.Namespace(k=16, threshold=0.6, exact_max=50_000, dedupe_set=[])
    config = load_run_config("default", bench._distributed_overrides(args))
    run = str(tmp_path / "run")
    truth = bench.write_synthetic_run(run, config, n=3000, dim=384, seed=1, rows_per_part=500, parts_per_chunk=2)
    assert len(truth) == 3000 and len(np.unique(truth)) < 3000  # planted copies

    emb = pq.read_table(f"{run}/embeddings/part-00005.parquet")
    man = pq.read_table(f"{run}/manifest/part-00005.parquet")
    assert emb.schema == schemas.embeddings(384, "float16") and man.schema == schemas.MANIFEST
    assert emb.num_rows == man.num_rows == 500 and emb["uid"].equals(man["uid"])
    uids = emb["uid"].to_pylist()
    assert all(len(u) == 40 for u in uids) and uids == sorted(uids) and len(set(uids)) == 500
    x, groups = bench.read_synthetic_vectors(run)
    assert x.shape == (3000, 384) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-2)
    assert (groups == truth).all()

    rec = run_stages(config, run, LocalExecutor(), ["dedupe"])["dedupe"]
    assert rec["in"] == 3000 and rec["dedup_parts"] == 6 and rec["worker_peak_rss_mb"] > 20
    precision, recall = bench.dedup_precision_recall(run)
    assert precision > 0.99 and recall > 0.99
    assert json.loads((tmp_path / "run" / "dedup" / "_SUCCESS.json").read_text())["in"] == 3000
