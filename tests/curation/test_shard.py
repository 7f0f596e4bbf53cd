"""Shard stage: WebDataset round trips (webdataset, Ray Data, tar), labels, lineage, determinism and resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from curation.config import RunConfig
from curation.io.fs import read_json
from curation.stages import LocalExecutor, run_stages
from curation.stages.shard import ShardStage
from pretrain.utils.config import load_config

from .conftest import jpeg_bytes, photos

CLASSES = ["animals", "objects", "scenes"]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished ingest -> embed -> dedupe run over 18 labelled photos (JPEG and PNG, one exact duplicate,
    one unlabelled directory, one tar source with class directories inside)."""
    root = tmp_path_factory.mktemp("shard")
    src = root / "src"
    pics = photos(160)
    expected: dict[str, int | None] = {}
    for i, (name, im) in enumerate(pics[:18]):
        label = i % 3
        data = _png(im) if i % 4 == 1 else jpeg_bytes(im)
        if i >= 15:  # these go into a tar, with the class directory inside the archive
            continue
        d = src / (CLASSES[label] if i != 14 else "misc")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.{'png' if i % 4 == 1 else 'jpg'}").write_bytes(data)
        expected[hashlib.sha1(data).hexdigest()] = label if i != 14 else None
    with tarfile.open(src / "extra.tar", "w") as tf:
        for i, (name, im) in enumerate(pics[15:18], start=15):
            data = jpeg_bytes(im)
            info = tarfile.TarInfo(f"{CLASSES[i % 3]}/{name}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            expected[hashlib.sha1(data).hexdigest()] = i % 3
    first = next(p for p in (src / CLASSES[0]).iterdir())
    shutil.copy(first, src / CLASSES[0] / "exact_copy.jpg")
    cfg = _config(src)
    run = root / "run"
    records = run_stages(cfg, str(run), LocalExecutor(), ["ingest", "embed", "dedupe"])
    assert records["ingest"]["out"] == 18 and records["ingest"]["duplicates"] == 1
    return src, run, expected, records["dedupe"]["out"]


def _config(src, *overrides: str) -> RunConfig:
    return load_config(
        RunConfig,
        "curation/recipes/default.toml",
        [f'ingest.sources=["{src}"]', "ingest.files_per_part=8", "ingest.rows_per_part=8", "embed.batch_size=8",
         "shard.samples_per_shard=5", 'shard.label_from="parent_dir"', f"shard.classes={json.dumps(CLASSES)}",
         *overrides],
    )  # fmt: skip


def _fresh(base_run, tmp_path, name="run"):
    src, run, expected, kept = base_run
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return src, str(dst), expected, kept


def _tar_bytes(run_dir: str) -> dict[str, bytes]:
    d = os.path.join(run_dir, "shards")
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d)) if n.endswith(".tar")}


def test_shards_round_trip_webdataset_and_tar(base_run, tmp_path):
    src, run, expected, kept = _fresh(base_run, tmp_path)
    rec = run_stages(_config(src), run, LocalExecutor(), ["shard"])["shard"]
    assert rec["selection"] == "dedup" and rec["out"] == kept and rec["shards"] == -(-kept // 5)
    index = read_json(f"{run}/shards/index.json")
    names = [f"shard-{i:06d}.tar" for i in range(rec["shards"])]
    assert [s["name"] for s in index["shards"]] == names
    assert index["pattern"] == f"shard-{{000000..{rec['shards'] - 1:06d}}}.tar"
    for s in index["shards"]:
        data = Path(f"{run}/shards/{s['name']}").read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert [s["count"] for s in index["shards"]] == [5] * (kept // 5) + ([kept % 5] if kept % 5 else [])

    ds = wds.WebDataset(f"{run}/shards/{index['pattern']}", shardshuffle=False).decode("pil")
    seen = {}
    for sample in ds:
        meta = sample["json"]
        assert sample["__key__"] == meta["uid"] and meta["uid"] in expected
        assert isinstance(sample["jpg"], Image.Image) and sample["jpg"].mode == "RGB"
        assert sample["jpg"].size == (meta["stored"]["width"], meta["stored"]["height"])
        assert meta["selection"]["reason"] == "kept" and meta["component"] is not None
        assert meta["source"].startswith(str(src)) and meta["source"] in meta["uris"]
        label = expected[meta["uid"]]
        assert meta["label"] == label and sample.get("cls") == label  # no .cls member when unlabelled
        assert meta["stored"]["reencoded"] == (meta["source_format"].upper() != "JPEG")
        seen[meta["uid"]] = meta
    assert len(seen) == kept == 18 - 0  # 18 distinct photos (the exact copy collapsed at ingest)
    assert sum(m["label"] is None for m in seen.values()) == 1
    assert any("#" in m["source"] for m in seen.values())  # tar members carry their class dir too

    listing = subprocess.run(["tar", "-tvf", f"{run}/shards/{names[0]}"], capture_output=True, text=True, check=True)
    lines = listing.stdout.splitlines()
    assert all(" 0/0 " in ln and "1970-01-01" in ln and ln.startswith("-rw-r--r--") for ln in lines)
    members = [ln.split()[-1] for ln in lines]
    keys = [m.split(".")[0] for m in members]
    assert keys == sorted(keys, key=keys.index)  # members of a sample are contiguous
    assert len(set(keys)) == 5


def test_shards_read_by_ray_data(base_run, tmp_path, ray_session):
    import ray

    src, run, expected, kept = _fresh(base_run, tmp_path)
    run_stages(_config(src), run, LocalExecutor(), ["shard"])
    tars = [f"{run}/shards/{s['name']}" for s in read_json(f"{run}/shards/index.json")["shards"]]
    ds = ray.data.read_webdataset(tars, decoder=None)
    rows = ds.take_all()
    assert len(rows) == kept
    for row in rows:
        meta = json.loads(row["json"])
        assert row["__key__"] == meta["uid"]
        label = expected[meta["uid"]]
        cls = row.get("cls")
        missing = cls is None or isinstance(cls, float) and cls != cls  # Ray fills an absent member with null/NaN
        assert (None if missing else int(cls)) == label
        assert Image.open(io.BytesIO(row["jpg"])).size == (meta["stored"]["width"], meta["stored"]["height"])


def test_rerun_is_byte_identical_and_seed_changes_order(base_run, tmp_path):
    src = base_run[0]
    _, run_a, _, _ = _fresh(base_run, tmp_path, "a")
    _, run_b, _, _ = _fresh(base_run, tmp_path, "b")
    _, run_c, _, _ = _fresh(base_run, tmp_path, "c")
    run_stages(_config(src), run_a, LocalExecutor(), ["shard"])
    run_stages(_config(src), run_b, LocalExecutor(), ["shard"])
    run_stages(_config(src, "seed=7"), run_c, LocalExecutor(), ["shard"])
    a, b, c = _tar_bytes(run_a), _tar_bytes(run_b), _tar_bytes(run_c)
    assert a == b and len(a) == 4
    assert a != c  # another seed, another global order (same samples)

    def keys(files: dict[str, bytes]) -> list[str]:
        out = []
        for data in files.values():
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                out += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".json")]
        return out

    assert sorted(keys(a)) == sorted(keys(c)) and keys(a) != keys(c)
    assert keys(run_unshuffled := _shuffle_off(base_run, tmp_path)) == sorted(keys(run_unshuffled))


def _shuffle_off(base_run, tmp_path) -> dict[str, bytes]:
    src, run, _, _ = _fresh(base_run, tmp_path, "sorted")
    run_stages(_config(src, "shard.shuffle=false"), run, LocalExecutor(), ["shard"])
    return _tar_bytes(run)


class _Crash(RuntimeError):
    pass


class CrashingExecutor(LocalExecutor):
    """Dies (like a killed driver) after ``after`` parts finished."""

    def __init__(self, after: int) -> None:
        self.after = after

    def map(self, fn, items, *, desc, num_cpus=1):
        for n, item in enumerate(items):
            if n == self.after:
                raise _Crash(f"killed after {n} parts")
            yield fn(item)


def test_killed_shard_stage_resumes_without_rewriting(base_run, tmp_path):
    src, ref_run, _, _ = _fresh(base_run, tmp_path, "ref")
    run_stages(_config(src), ref_run, LocalExecutor(), ["shard"])
    _, run, _, _ = _fresh(base_run, tmp_path, "crash")
    with pytest.raises(_Crash):
        run_stages(_config(src), run, CrashingExecutor(after=2), ["shard"])
    done = sorted(n for n in os.listdir(f"{run}/shards") if n.endswith(".tar"))
    assert done == ["shard-000000.tar", "shard-000001.tar"] and not os.path.exists(f"{run}/shards/_SUCCESS.json")
    stat = {n: os.stat(f"{run}/shards/{n}") for n in done}
    rec = run_stages(_config(src), run, LocalExecutor(), ["shard"])["shard"]
    assert rec["parts_computed"] == rec["shards"] - 2 and rec["parts_skipped"] == 2
    for n in done:  # finished shards were not rewritten
        assert os.stat(f"{run}/shards/{n}").st_ino == stat[n].st_ino
        assert os.stat(f"{run}/shards/{n}").st_mtime_ns == stat[n].st_mtime_ns
    assert _tar_bytes(run) == _tar_bytes(ref_run)
    assert read_json(f"{run}/shards/index.json")["shards"] == read_json(f"{ref_run}/shards/index.json")["shards"]
    # a shard lost after the run (file and marker deleted) is rebuilt identically on the next run
    os.remove(f"{run}/shards/shard-000003.tar")
    os.remove(f"{run}/_work/shard/shard/part-00003.json")
    os.remove(f"{run}/shards/_SUCCESS.json")
    rec = run_stages(_config(src), run, LocalExecutor(), ["shard"])["shard"]
    assert rec["parts_computed"] == 1 and _tar_bytes(run) == _tar_bytes(ref_run)


def test_reencode_max_side_never_and_byte_limit(base_run, tmp_path):
    src, run, _, kept = _fresh(base_run, tmp_path, "small")
    rec = run_stages(_config(src, "shard.max_side=64", "shard.reencode=\"always\"", "shard.jpeg_quality=80"), run,
                     LocalExecutor(), ["shard"])["shard"]  # fmt: skip
    for data in _tar_bytes(run).values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    im = Image.open(tf.extractfile(m))
                    assert im.format == "JPEG" and max(im.size) == 64
    assert rec["out"] == kept
    src, run, _, _ = _fresh(base_run, tmp_path, "never")
    run_stages(_config(src, 'shard.reencode="never"'), run, LocalExecutor(), ["shard"])
    exts = set()
    for data in _tar_bytes(run).values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            exts |= {m.name.split(".", 1)[1] for m in tf.getmembers()}
    assert {"jpg", "png", "json", "cls"} == exts
    src, run, _, _ = _fresh(base_run, tmp_path, "bytes")
    limit = 40_000
    rec = run_stages(_config(src, "shard.samples_per_shard=100", f"shard.max_shard_bytes={limit}"), run,
                     LocalExecutor(), ["shard"])["shard"]  # fmt: skip
    index = read_json(f"{run}/shards/index.json")
    assert rec["shards"] > 1 and sum(s["count"] for s in index["shards"]) == kept
    assert all(s["bytes"] <= limit or s["count"] == 1 for s in index["shards"])


def test_unlabelled_samples_can_be_dropped(base_run, tmp_path):
    src, run, expected, kept = _fresh(base_run, tmp_path, "drop")
    rec = run_stages(_config(src, 'shard.unlabelled="drop"'), run, LocalExecutor(), ["shard"])["shard"]
    assert rec["in"] == kept and rec["out"] == kept - 1 and rec["rejected"] == {"unlabelled": 1}
    samples = list(wds.WebDataset(f"{run}/shards/{rec['pattern']}", shardshuffle=False))
    assert len(samples) == kept - 1 and all(int(x["cls"]) == expected[x["__key__"]] for x in samples)
    with pytest.raises(ValueError, match="shard.label_from"):
        _config(src, 'shard.unlabelled="drop"', 'shard.label_from="none"')


def test_labels_from_a_pool_without_class_folders(base_run, tmp_path, caplog):
    """No directory name is a class: "drop" fails naming what to set (no empty index.json); "keep" writes
    unlabelled samples and says so."""
    src, run, _, kept = _fresh(base_run, tmp_path, "noclass")
    with pytest.raises(ValueError, match=r"shard.classes.*shard.unlabelled='keep'"):
        run_stages(_config(src, 'shard.unlabelled="drop"', 'shard.classes=["no-such-class"]'), run,
                   LocalExecutor(), ["shard"])  # fmt: skip
    assert not os.path.exists(f"{run}/shards/index.json")
    _, run2, _, _ = _fresh(base_run, tmp_path, "noclass-keep")
    with caplog.at_level("WARNING"):
        rec = run_stages(_config(src, 'shard.classes=["no-such-class"]'), run2, LocalExecutor(), ["shard"])["shard"]
    assert rec["out"] == kept and rec["labelled"] == 0 and "found no label" in caplog.text
    with open(f"{run2}/shards/index.json") as f:
        index = json.load(f)
    assert all(os.path.exists(f"{run2}/shards/{s['name']}") for s in index["shards"])
    assert len(list(wds.WebDataset(f"{run2}/shards/{rec['pattern']}", shardshuffle=False))) == kept


def test_bad_selection_setting_names_the_field(base_run, tmp_path):
    src, run, _, _ = _fresh(base_run, tmp_path, "bad")
    with pytest.raises(ValueError, match="shard.selection='selection'"):
        run_stages(_config(src, 'shard.selection="selection"'), run, LocalExecutor(), ["shard"])
    with pytest.raises(ValueError, match="shard.prefix"):
        _config(src, 'shard.prefix="a/b"')
    assert ShardStage.output == "shards"


def test_never_reencode_stores_only_members_the_pretrain_readers_read(tmp_path):
    """With ``reencode = "never"``, a BMP (TIFF, GIF) source becomes a JPEG member, a PNG keeps its bytes: every
    sample is read by the training loader (:mod:`pretrain.data.wds`) and the eval shards (:mod:`pretrain.eval`)."""
    from pretrain.data.augment import MultiCropConfig
    from pretrain.data.loader import WdsLoader
    from pretrain.data.wds import WdsConfig
    from pretrain.eval.datasets import open_dataset
    from pretrain.utils.wds_sample import IMAGE_EXTENSIONS

    src = tmp_path / "src"
    expected: dict[str, tuple[int, str, str]] = {}  # uid -> (label, source format, stored extension)
    for i, ((name, im), fmt) in enumerate(zip(photos(160), ("BMP", "TIFF", "GIF", "PNG"))):
        buf = io.BytesIO()
        im.save(buf, fmt)
        d = src / CLASSES[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.{fmt.lower()}").write_bytes(buf.getvalue())
        expected[hashlib.sha1(buf.getvalue()).hexdigest()] = (i % 3, fmt, "png" if fmt == "PNG" else "jpg")
    run = str(tmp_path / "run")
    rec = run_stages(_config(src, 'shard.reencode="never"'), run, LocalExecutor(),
                     ["ingest", "embed", "dedupe", "shard"])["shard"]  # fmt: skip
    assert rec["out"] == len(expected) == 4 and rec["shards"] == 1
    pattern = f"{run}/shards/{rec['pattern']}"

    stored = {}
    for data in _tar_bytes(run).values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for m in tf.getmembers():
                uid, ext = m.name.split(".", 1)
                assert ext in (*IMAGE_EXTENSIONS, "json", "cls")
                if ext == "json":
                    meta = json.loads(tf.extractfile(m).read())
                    assert meta["stored"]["reencoded"] == (meta["source_format"].upper() != "PNG")
                elif ext != "cls":
                    stored[uid] = ext
    assert stored == {u: e for u, (_, _, e) in expected.items()}

    cfg = WdsConfig(urls=[pattern], batch_size=4, num_workers=0, shuffle_buffer=0, shards_per_window=1,
                    label_key="cls")  # fmt: skip
    loader = WdsLoader(cfg, MultiCropConfig(global_size=28, local_size=14, n_local=2), patch_size=7)
    batch = next(iter(loader))
    assert sorted(batch["keys"]) == sorted(expected)
    assert batch["labels"].tolist() == [expected[k][0] for k in batch["keys"]]
    assert loader.metrics()["missing_image"] == loader.metrics()["corrupt_image"] == 0

    ds = open_dataset(pattern, transform=None)
    samples = {key: (label, img) for img, label, _, key in ds}
    assert {k: lab for k, (lab, _) in samples.items()} == {u: lab for u, (lab, _, _) in expected.items()}
    assert all(isinstance(img, Image.Image) for _, img in samples.values())
