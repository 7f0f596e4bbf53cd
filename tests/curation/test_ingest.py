"""Ingest stage logic without Ray: sources of every kind, exact-duplicate collapse, rejects, lineage, resume."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from curation.config import RunConfig
from curation.io.fs import read_json
from curation.io.lineage import lineage
from curation.stages import IngestStage, LocalExecutor
from pretrain.utils.config import load_config

from .conftest import jpeg_bytes, photos


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Loose files, a WebDataset shard, a hostile tar and a parquet URI list; returns (paths, expected bytes)."""
    root = tmp_path_factory.mktemp("corpus")
    pics = [im.resize((96, 64)) for _, im in photos()[:5]]
    a, b, c, d, e = jpeg_bytes(pics[0]), _png(pics[1]), jpeg_bytes(pics[2]), jpeg_bytes(pics[3]), jpeg_bytes(pics[4])
    files = {
        "dir/a.jpg": a,
        "dir/sub/b.png": b,
        "dir/copy_of_a.jpeg": a,
        "dir/empty.jpg": b"",
        "dir/text.jpg": b"hello, I am not a picture\n",
        "dir/trunc.jpg": c[: len(c) // 2],
        "dir/tiny.png": _png(pics[0].resize((1, 1))),
        "dir/notes.txt": b"ignored by directory listing",
        "listed/d.jpg": d,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "shards").mkdir()
    with wds.TarWriter(str(root / "shards" / "s-000.tar")) as w:
        w.write({"__key__": "k0", "jpg": a, "json": b'{"caption": "dup of a"}'})
        w.write({"__key__": "k1", "jpg": c})
    with tarfile.open(root / "shards" / "s-001.tar", "w") as tf:
        for name, data in (("../evil.jpg", e), ("ok/e.jpg", e)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    pq.write_table(pa.table({"uri": [str(root / "listed" / "d.jpg")]}), root / "list.parquet")
    sources = [str(root / "dir"), str(root / "shards" / "s-{000..001}.tar"), str(root / "list.parquet")]
    return root, sources, {"a": a, "b": b, "c": c, "d": d, "e": e}


def _config(sources, *extra):
    return load_config(RunConfig, None, [f"ingest.sources={sources!r}".replace("'", '"'), "ingest.files_per_part=3",
                                         "ingest.rows_per_part=2", *extra])  # fmt: skip


def _table(run_dir, sub):
    fs, path = fsspec.core.url_to_fs(f"{run_dir}/{sub}")
    parts = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in parts])


def test_ingest_sources_duplicates_rejects_and_lineage(corpus, tmp_path):
    root, sources, blobs = corpus
    run = str(tmp_path / "run")
    rec = IngestStage(_config(sources), run).execute(LocalExecutor())
    manifest = _table(run, "manifest")
    sha = {k: hashlib.sha1(v).hexdigest() for k, v in blobs.items()}
    # a (3 sources), b, c (tar), d (parquet list), e (tar); the truncated half of c is rejected.
    assert sorted(manifest["uid"].to_pylist()) == sorted(sha[k] for k in "abcde")
    rows = {r["uid"]: r for r in manifest.to_pylist()}
    tar0 = str(root / "shards" / "s-000.tar")
    assert rows[sha["a"]]["uris"] == sorted([str(root / "dir" / "a.jpg"), str(root / "dir" / "copy_of_a.jpeg"),
                                             f"{tar0}#k0.jpg"])  # fmt: skip
    assert rows[sha["c"]]["container"] == tar0 and rows[sha["c"]]["offset"] > 0
    assert (rows[sha["b"]]["width"], rows[sha["b"]]["height"], rows[sha["b"]]["format"]) == (96, 64, "png")
    rejects = {os.path.relpath(r["uri"], root): r["reason"] for r in _table(run, "rejects").to_pylist()}
    assert rejects == {
        "dir/empty.jpg": "empty",
        "dir/text.jpg": "not_image",
        "dir/trunc.jpg": "truncated",
        "dir/tiny.png": "too_small",
        "shards/s-001.tar#../evil.jpg": "unsafe_member_name",
        "shards/s-001.tar#link.jpg": "not_a_regular_file",
    }
    assert not (tmp_path / "evil.jpg").exists() and not (root / "evil.jpg").exists()
    assert rec["in"] == 13 and rec["out"] == 5 and rec["duplicates"] == 2
    assert rec["rejected"] == {"empty": 1, "not_a_regular_file": 1, "not_image": 1, "too_small": 1,
                               "truncated": 1, "unsafe_member_name": 1}  # fmt: skip
    assert rec["skipped_non_image"] == 1  # the WebDataset .json side file
    assert rec["manifest_parts"] == 4 and read_json(f"{run}/manifest/_SUCCESS.json") == rec
    for key in ("seconds", "items_per_s", "config_hash", "code_version"):
        assert key in rec

    info = lineage(run, str(root / "dir" / "copy_of_a.jpeg"))
    assert info["uid"] == sha["a"] and info["status"] == "ok"
    assert str(root / "dir" / "a.jpg") in info["duplicate_uris"] and info["kept"] is None
    bad = lineage(run, str(root / "dir" / "trunc.jpg"))
    assert bad["status"] == "rejected" and bad["reason"] == "truncated" and bad["kept"] is False
    assert lineage(run, str(root / "nope.jpg"))["found"] is False
    for r in _table(run, "rejects").to_pylist():  # every rejected input is findable by the URI ingest recorded
        info = lineage(run, r["uri"])
        assert info["found"] and info["status"] == "rejected" and info["reason"] == r["reason"], r["uri"]
    unsafe = lineage(run, os.path.relpath(f"{root}/shards/s-001.tar", os.getcwd()) + "#../evil.jpg")
    assert unsafe["found"] and unsafe["reason"] == "unsafe_member_name"  # relative tar path, verbatim member


def test_ingest_rerun_skips_finished_parts(corpus, tmp_path):
    _, sources, _ = corpus
    run = str(tmp_path / "run")
    cfg = _config(sources)
    IngestStage(cfg, run).execute(LocalExecutor())
    (tmp_path / "run" / "manifest" / "_SUCCESS.json").unlink()  # as if killed before the end
    marker = tmp_path / "run" / "_work" / "ingest" / "scan" / "part-00001.json"
    marker.unlink()  # ... and in the middle of scan part 1
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("part-*.parquet")}
    rec = IngestStage(cfg, run).execute(LocalExecutor())
    assert rec["parts_computed"] == 1 and rec["parts_skipped"] == rec["parts"] - 1
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("part-*.parquet")}
    changed = sorted(p.relative_to(tmp_path / "run").as_posix() for p in before if before[p] != after[p])
    assert changed == ["occurrences/part-00001.parquet", "rejects/part-00001.parquet"]
    again = IngestStage(cfg, run).execute(LocalExecutor())
    assert again == {**rec, "skipped": True}  # finished stage: nothing recomputed, same record, marked skipped
    with pytest.raises(ValueError, match="another configuration"):
        IngestStage(_config(sources, "ingest.decode.min_side=8"), run).execute(LocalExecutor())


def test_ingest_on_memory_filesystem(corpus):
    root, _, blobs = corpus
    fs = fsspec.filesystem("memory")
    fs.pipe({"/src/x/a.jpg": blobs["a"], "/src/x/b.png": blobs["b"], "/src/y/a-again.jpg": blobs["a"]})
    fs.put(str(root / "shards" / "s-000.tar"), "/src/shards/s-000.tar")
    run = "memory://runs/ingest-test"
    rec = IngestStage(_config(["memory://src/x", "memory://src/y/*.jpg", "memory://src/shards/*.tar"]), run).execute(
        LocalExecutor()
    )
    manifest = _table(run, "manifest")
    assert rec["out"] == 3 and manifest.num_rows == 3
    uris = {u for us in manifest["uris"].to_pylist() for u in us}
    assert "memory:///src/y/a-again.jpg" in uris and "memory:///src/shards/s-000.tar#k1.jpg" in uris
    fs.rm("/runs/ingest-test", recursive=True)


def test_ingest_source_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="ingest.sources is empty"):
        IngestStage(_config([]), str(tmp_path / "r")).execute(LocalExecutor())
    with pytest.raises(ValueError, match="matched no image"):
        IngestStage(_config([str(tmp_path / "missing")]), str(tmp_path / "r2")).execute(LocalExecutor())
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "l.parquet")
    with pytest.raises(ValueError, match="ingest.uri_column"):
        IngestStage(_config([str(tmp_path / "l.parquet")]), str(tmp_path / "r3")).execute(LocalExecutor())


def test_fewer_collapse_tasks_give_the_same_manifest(corpus, tmp_path):
    _, sources, _ = corpus
    IngestStage(_config(sources), str(tmp_path / "a")).execute(LocalExecutor())
    rec = IngestStage(_config(sources, "ingest.collapse_tasks=3"), str(tmp_path / "b")).execute(LocalExecutor())
    assert rec["manifest_parts"] == 4 and rec["parts"] == 5 + 2  # 5 scan parts, 2 collapse tasks (2 buckets each)
    for i in range(4):
        name = f"manifest/part-{i:05d}.parquet"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    uids = _table(str(tmp_path / "b"), "manifest")["uid"].to_pylist()
    assert uids == sorted(uids) and len(set(uids)) == 5
