"""The hostile corpus (tests/curation/hostile.py: truncated, empty, text, bombs, bad CRCs, 16-bit, CMYK, animated,
1x1, palette+alpha, EXIF rotation, an evil tar, ...) through the whole pipeline: every file ends in ``rejects/``
with its reason or in the manifest converted to the expected size, embedding works on every accepted image,
the run succeeds, and nothing is written to the local disk (tar member names are never paths)."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import RunConfig
from curation.io.lineage import lineage
from curation.stages import LocalExecutor, run_stages
from pretrain.utils.config import load_config

from .hostile import corpus_uris, make_hostile_corpus, no_writes


def _table(run_dir: str, sub: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(f"{run_dir}/{sub}")
    parts = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts])


def test_hostile_corpus_runs_end_to_end(tmp_path):
    expected = corpus_uris(tmp_path / "corpus", make_hostile_corpus(tmp_path / "corpus"))
    assert len({v for v in expected.values() if v.startswith("reject:")}) >= 8 and len(expected) >= 30
    run = "memory://hostile-run"
    cfg = load_config(RunConfig, "curation/recipes/default.toml",
                      [f'ingest.sources=["{tmp_path / "corpus"}"]', "ingest.rows_per_part=8"])  # fmt: skip
    with no_writes() as writes:
        records = run_stages(cfg, run, LocalExecutor())
    assert writes == []  # the run dir is in memory: no byte may land on the local disk

    rejects = {r["uri"]: r["reason"] for r in _table(run, "rejects").to_pylist()}
    manifest = _table(run, "manifest").to_pylist()
    size_of = {uri: f"ok:RGB {r['width']}x{r['height']}" for r in manifest for uri in r["uris"]}
    outcome = {**{u: f"reject:{why}" for u, why in rejects.items()}, **size_of}
    assert outcome == expected
    n_ok = sum(v.startswith("ok:") for v in expected.values())
    assert records["ingest"]["in"] == len(expected)
    assert records["ingest"]["out"] + records["ingest"]["duplicates"] == n_ok
    assert records["embed"]["out"] == records["embed"]["in"] == len(manifest)
    assert records["dedupe"]["in"] == len(manifest)
    evil = next(u for u, v in expected.items() if "#" in u and v.startswith("reject:"))
    assert lineage(run, evil)["reason"] == expected[evil].split(":", 1)[1]
    fsspec.filesystem("memory").rm("/hostile-run", recursive=True)
