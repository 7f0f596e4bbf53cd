"""Copy-detection quality of the default pipeline on real photos and synthetic copies, exact-duplicate
collapse and decontamination against a held-out reference set."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import RunConfig
from curation.io.lineage import lineage
from curation.stages import LocalExecutor, run_stages
from pretrain.utils.config import load_config

from .conftest import jpeg_bytes, make_copy, photos, write_copy_corpus


def _table(run_dir: str, sub: str) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(f"{run_dir}/{sub}")
    parts = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts])


def _pairs(groups: dict[str, int]) -> set[tuple[str, str]]:
    by = defaultdict(list)
    for key, g in groups.items():
        by[g].append(key)
    return {tuple(sorted(p)) for members in by.values() for p in itertools.combinations(members, 2)}


def test_default_pipeline_finds_copies_and_decontaminates(tmp_path: Path):
    rng = random.Random(0)
    pool, refs = tmp_path / "pool", tmp_path / "refs"
    pool.mkdir()
    refs.mkdir()
    truth: dict[str, int] = {}  # pool file -> photo id
    pics = photos(512)
    held_out = {len(pics) - 3, len(pics) - 2, len(pics) - 1}
    for g, (name, im) in enumerate(pics):
        if g in held_out:  # reference (evaluation) image: only copies of it leak into the pool
            (refs / f"{name}.jpg").write_bytes(jpeg_bytes(im))
        else:
            (pool / f"{name}.jpg").write_bytes(jpeg_bytes(im))
            truth[str(pool / f"{name}.jpg")] = g
        for c in range(3 if g % 3 else 0):
            data, _ = make_copy(im, rng)
            (pool / f"{name}_copy{c}.jpg").write_bytes(data)
            truth[str(pool / f"{name}_copy{c}.jpg")] = g
    for name, _ in pics[:3]:  # byte-identical duplicates under another name
        (pool / f"{name}_same_bytes.jpg").write_bytes((pool / f"{name}.jpg").read_bytes())
    assert len(truth) == 24 + 18 * 3

    run = "memory://copy-detection"
    cfg = load_config(RunConfig, "curation/recipes/default.toml", [
        f'ingest.sources=["{pool}"]', "ingest.rows_per_part=32",
        f'dedupe.references=[{{name = "eval", sources = ["{refs}"]}}]',
    ])  # fmt: skip
    records = run_stages(cfg, run, LocalExecutor())
    assert records["ingest"]["in"] == len(truth) + 3 and records["ingest"]["duplicates"] == 3
    manifest = {r["uri"]: r for r in _table(run, "manifest").to_pylist()}
    for name, _ in pics[:3]:
        assert manifest[str(pool / f"{name}.jpg")]["uris"] == [str(pool / f"{name}.jpg"),
                                                               str(pool / f"{name}_same_bytes.jpg")]  # fmt: skip
    uid_of = {uri: row["uid"] for row in manifest.values() for uri in row["uris"]}
    dedup = {r["uid"]: r for r in _table(run, "dedup").to_pylist()}
    assert len(dedup) == len(truth)

    # Copy detection among pool images that are not copies of the reference set.
    clean = {f: g for f, g in truth.items() if g not in held_out}
    true_pairs = _pairs(clean)
    found_pairs = _pairs({f: dedup[uid_of[f]]["component"] for f in clean})
    tp = len(true_pairs & found_pairs)
    precision, recall = tp / len(found_pairs), tp / len(true_pairs)
    print(f"copy detection: precision {precision:.3f} recall {recall:.3f} ({tp}/{len(true_pairs)} pairs)")
    assert precision >= 0.95 and recall >= 0.9
    kept_per_photo = defaultdict(int)
    for f, g in clean.items():
        kept_per_photo[g] += dedup[uid_of[f]]["keep"]
    assert sum(v == 1 for v in kept_per_photo.values()) >= 0.9 * len(kept_per_photo)

    # Decontamination: every pool copy of a held-out reference image is dropped, nothing else.
    leaked = {f for f, g in truth.items() if g in held_out}
    contaminated = {f for f in truth if dedup[uid_of[f]]["contaminated"]}
    assert leaked and contaminated == leaked
    assert all(not dedup[uid_of[f]]["keep"] for f in leaked)
    report = _table(run, "decontam").to_pylist()
    assert {r["uid"] for r in report} >= {uid_of[f] for f in leaked}
    assert all(r["reference"] == "eval" and r["ref_uri"].startswith(str(refs)) and r["score"] > 0.40 for r in report)
    assert records["dedupe"]["rejected"]["contaminated"] == len(leaked)

    some_copy = next(f for f, g in clean.items() if "_copy" in f)
    info = lineage(run, some_copy)
    assert info["uid"] == uid_of[some_copy] and info["component"] == dedup[uid_of[some_copy]]["component"]
    assert info["kept"] == dedup[uid_of[some_copy]]["keep"]
    fsspec.filesystem("memory").rm("/copy-detection", recursive=True)


def test_background_score_normalisation_lowers_scores(tmp_path: Path):
    truth = write_copy_corpus(tmp_path / "pool", originals=6, copies=1, seed=11)
    bg = tmp_path / "background"
    bg.mkdir()
    for name, im in photos(256)[-6:]:  # distinct photos, none of them in the pool
        (bg / f"{name}.jpg").write_bytes(jpeg_bytes(im))
    base = [f'ingest.sources=["{tmp_path / "pool"}"]']
    plain = load_config(RunConfig, "curation/recipes/default.toml", base)
    normed = load_config(RunConfig, "curation/recipes/default.toml",
                         [*base, f'dedupe.background=["{bg}"]', "dedupe.threshold=0.3"])  # fmt: skip
    run_stages(plain, "memory://bg-plain", LocalExecutor())
    rec = run_stages(normed, "memory://bg-normed", LocalExecutor())
    assert rec["dedupe"]["in"] == len(truth) == 10 and rec["dedupe"]["rejected"]["duplicate"] == 4
    assert _table("memory://bg-normed", "background/manifest").num_rows == 6
    a = {r["uid"]: r["score"] for r in _table("memory://bg-plain", "dedup").to_pylist()}
    b = {r["uid"]: r["score"] for r in _table("memory://bg-normed", "dedup").to_pylist()}
    assert all(b[u] < a[u] - 0.01 for u in a)  # every score lost its background bias
    fsspec.filesystem("memory").rm("/bg-plain", recursive=True)
    fsspec.filesystem("memory").rm("/bg-normed", recursive=True)
