"""The whole pipeline on an in-process Ray gives byte-identical outputs to the Ray-free executor."""

from __future__ import annotations

import fsspec
import pytest

from curation.config import RunConfig
from curation.io.fs import read_json
from curation.stages import LocalExecutor, run_stages
from pretrain.utils.config import load_config

from .conftest import write_copy_corpus


def _parquet_files(run_dir: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(run_dir)
    return {p[len(path):]: fs.cat_file(p) for p in fs.find(path) if p.endswith(".parquet")}


def test_ray_pipeline_matches_local(ray_session, tmp_path):
    from curation.ray import RayExecutor

    truth = write_copy_corpus(tmp_path / "src", originals=6, copies=2, seed=3)
    cfg = load_config(
        RunConfig,
        "curation/recipes/default.toml",
        [f'ingest.sources=["{tmp_path / "src"}"]', "ingest.files_per_part=4", "ingest.rows_per_part=4",
         "embed.batch_size=3"],
    )  # fmt: skip
    with pytest.raises(ValueError, match="memory://"):
        run_stages(cfg, "memory://ray-run", RayExecutor())
    ray_run = str(tmp_path / "ray-run")
    records = run_stages(cfg, ray_run, RayExecutor())
    assert records["ingest"]["out"] == len(truth) == 14
    assert records["ingest"]["scan_parts"] == 4 and records["ingest"]["manifest_parts"] == 4
    assert records["embed"]["out"] == 14 and records["embed"]["actors"] == 2 and records["embed"]["dim"] == 5632
    assert records["dedupe"]["in"] == 14 and records["dedupe"]["out"] == 6  # one image kept per original
    assert read_json(f"{ray_run}/dedup/_SUCCESS.json")["rejected"] == {"contaminated": 0, "duplicate": 8}

    local_run = "memory://local-run"
    run_stages(cfg, local_run, LocalExecutor())
    ray_files, local_files = _parquet_files(ray_run), _parquet_files(local_run)
    # 4 parts each of occurrences, rejects, manifest, embeddings, dedup; decontam; verify (candidate pair records)
    assert sorted(ray_files) == sorted(local_files) and len(ray_files) == 5 * 4 + 1 + 1
    assert all(ray_files[k] == local_files[k] for k in ray_files)
    fsspec.filesystem("memory").rm("/local-run", recursive=True)
