"""curation.io.tar_stream: safe streaming, damage detection, flat memory, WebDataset grouping, re-reads by offset."""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds

from curation.io.tar_stream import (
    TarMember,
    TarStreamError,
    group_webdataset,
    iter_tar_members,
    read_member,
    split_key,
    unsafe_name_reason,
)
from tests.curation.hostile import no_writes, tar_bytes


def stream_without_writes(path: Path, **kw) -> list[TarMember]:
    """Iterate the tar at ``path`` while recording every filesystem write the process attempts."""
    with open(path, "rb") as f, no_writes() as events:
        members = list(iter_tar_members(f, str(path), **kw))
    assert events == [], f"streaming a tar touched the filesystem: {events}"
    return members


def test_no_writes_guard_sees_writes(tmp_path):
    with no_writes() as events:
        (tmp_path / "x").write_bytes(b"1")
        (tmp_path / "d").mkdir()
        os.symlink(tmp_path / "x", tmp_path / "l")
    assert [e for e, _ in events] == ["open", "os.mkdir", "os.symlink"]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, link
    return ti


GOOD = b"\xff\xd8\xff" + bytes(range(256)) * 3
EVIL = [
    (info("../evil.jpg"), b"evil"),
    (info("/abs.jpg"), b"abs"),
    (info("dir/", tarfile.DIRTYPE), None),
    (info("link.jpg", tarfile.SYMTYPE, "/etc/passwd"), None),
    (info("hard.jpg", tarfile.LNKTYPE, "../evil.jpg"), None),
    (info("blk", tarfile.BLKTYPE), None),
    (info("dir/good.jpg"), GOOD),
]
EVIL_EXPECTED = [
    ("../evil.jpg", "unsafe_member_name"),
    ("/abs.jpg", "unsafe_member_name"),
    ("link.jpg", "not_a_regular_file"),
    ("hard.jpg", "not_a_regular_file"),
    ("blk", "not_a_regular_file"),
    ("dir/good.jpg", None),
]


# ---------------------------------------------------------------- safety


def test_hostile_members_are_rejected_nothing_is_written_and_good_bytes_reread(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shard = work / "shard.tar"
    shard.write_bytes(tar_bytes(EVIL))
    monkeypatch.chdir(work)  # a ../ member would land in tmp_path, an extracted one in work
    before_parent, before_work = snapshot(tmp_path), snapshot(work)
    members = stream_without_writes(shard)
    assert snapshot(tmp_path) == before_parent and snapshot(work) == before_work
    assert not (tmp_path / "evil.jpg").exists() and not Path("/abs.jpg").exists()
    assert [(m.name, m.rejected_reason) for m in members] == EVIL_EXPECTED
    assert all(m.data is None and m.detail for m in members if m.rejected_reason)
    assert "'/etc/passwd'" in members[2].detail and members[1].detail == "absolute name"
    good = members[-1]
    assert good.data == GOOD and good.size == len(GOOD) and good.compression is None
    assert read_member(str(shard), good.offset_data, good.size) == GOOD
    assert shard.read_bytes()[good.offset_data : good.offset_data + good.size] == GOOD


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../x.jpg", "'..' component"),
        ("a/../../x.jpg", "'..' component"),
        ("a/..", "'..' component"),
        ("..\\x.jpg", "'..' component"),
        ("/x.jpg", "absolute name"),
        ("\\x.jpg", "absolute name"),
        ("C:x.jpg", "absolute name"),
        ("", "empty name"),
        ("a\x00.jpg", "NUL in name"),
        ("a/b/c.jpg", None),
        ("./a/b.jpg", None),
        ("a..b.jpg", None),
        ("...jpg", None),
    ],
)
def test_unsafe_name_rules(name, why):
    assert unsafe_name_reason(name) == why


def test_compressed_tars_stream_and_reread_by_offset(tmp_path):
    raw = tar_bytes(EVIL)
    for suffix, compress, kind in (
        (".tar.gz", gzip.compress, "gzip"),
        (".tar", gzip.compress, "gzip"),  # misleading suffix: compression comes from the bytes
        (".tar.bz2", bz2.compress, "bz2"),
        (".tar.xz", lzma.compress, "xz"),
    ):
        path = tmp_path / f"shard-{kind}{suffix}"
        path.write_bytes(compress(raw))
        members = stream_without_writes(path)
        assert [(m.name, m.rejected_reason) for m in members] == EVIL_EXPECTED, path.name
        good = members[-1]
        assert good.compression == kind and good.data == GOOD
        assert read_member(str(path), good.offset_data, good.size) == GOOD


def test_memory_filesystem_stream_and_read_member():
    fs = fsspec.filesystem("memory")
    fs.pipe("/shards/a.tar", tar_bytes([(info("k/0001.jpg"), GOOD), (info("k/0001.json"), b'{"a": 1}')]))
    with fs.open("/shards/a.tar", "rb") as f:
        members = list(iter_tar_members(f, "memory://shards/a.tar"))
    assert [m.name for m in members] == ["k/0001.jpg", "k/0001.json"]
    for m in members:
        assert read_member("memory://shards/a.tar", m.offset_data, m.size) == m.data


def test_oversized_member_is_skipped_without_being_held(tmp_path):
    big = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "big.tar"
    path.write_bytes(tar_bytes([(info("a.jpg"), GOOD), (info("huge.jpg"), big), (info("b.jpg"), GOOD[::-1])]))
    del big
    with open(path, "rb") as f:
        tracemalloc.start()
        try:
            members = list(iter_tar_members(f, str(path), max_member_bytes=1 << 20))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert [(m.name, m.rejected_reason) for m in members] == [
        ("a.jpg", None),
        ("huge.jpg", "too_large_file"),
        ("b.jpg", None),
    ]
    assert members[1].data is None and members[1].size == 4 << 20 and "skipped unread" in members[1].detail
    assert members[2].data == GOOD[::-1]
    assert peak < 1 << 20, f"peak {peak} bytes: the 4 MiB member was held in memory"


def test_max_member_bytes_validated():
    with pytest.raises(ValueError, match="max_member_bytes"):
        list(iter_tar_members(io.BytesIO(b""), "x", max_member_bytes=0))


# ---------------------------------------------------------------- damage


def _names_then_error(data: bytes) -> tuple[list[str], TarStreamError | None]:
    names: list[str] = []
    try:
        for m in iter_tar_members(io.BytesIO(data), "mem://shard.tar"):
            names.append(m.name)
    except TarStreamError as exc:
        return names, exc
    return names, None


def test_damaged_archives_raise_after_yielding_the_good_prefix():
    members = [(info(f"{i:04d}.jpg"), GOOD) for i in range(4)]
    raw = tar_bytes(members)
    second_header = 512 + 1024  # header + 768 data bytes padded to 1024
    cases = {
        "cut inside data": (raw[: second_header + 700], 1),
        "cut at a member boundary": (raw[: second_header + 512 + 1024], 2),
        "bad checksum midway": (raw[:second_header] + b"\x7f" + raw[second_header + 1 :], 1),
        "garbage": (b"this is not a tar archive" * 50, 0),
        "empty": (b"", 0),
        "truncated gzip": (gzip.compress(raw)[:300], 0),
        "zstd": (b"\x28\xb5\x2f\xfd" + bytes(100), 0),
    }
    for label, (data, n_good) in cases.items():
        names, err = _names_then_error(data)
        assert err is not None, label
        assert names == [f"{i:04d}.jpg" for i in range(n_good)] and err.members_read == n_good, (label, err)
        assert isinstance(err, ValueError) and "mem://shard.tar" in str(err)
    assert _names_then_error(raw) == ([f"{i:04d}.jpg" for i in range(4)], None)
    assert _names_then_error(bytes(10240)) == ([], None)  # an empty but well-formed archive


def test_metadata_header_bomb_is_refused_before_it_is_read():
    declared = 8 << 20  # a pax header of 8 MiB of zeros: ~8 KB gzipped; tarfile alone would hold it in memory
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, declared
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip container
    parts = [comp.compress(header.tobuf(format=tarfile.USTAR_FORMAT))]
    parts += [comp.compress(bytes(1 << 20)) for _ in range(declared >> 20)]
    bomb = b"".join([*parts, comp.compress(bytes(1024)), comp.flush()])
    assert len(bomb) < 64 << 10
    tracemalloc.start()
    try:
        names, err = _names_then_error(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert names == [] and err is not None and "metadata header" in str(err)
    assert peak < 1 << 20, f"peak {peak} bytes"


def test_long_names_in_pax_and_gnu_headers_still_work():
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            ti = tarfile.TarInfo("d/" + "x" * 300 + ".jpg")
            ti.size, ti.pax_headers = len(GOOD), {"comment": "\u00e9" * 2000}
            tf.addfile(ti, io.BytesIO(GOOD))
        members = list(iter_tar_members(io.BytesIO(buf.getvalue()), "x.tar"))
        assert [(m.name, m.data) for m in members] == [("d/" + "x" * 300 + ".jpg", GOOD)]


# ---------------------------------------------------------------- WebDataset


@pytest.mark.parametrize(
    ("name", "key", "ext"),
    [
        ("shard/000123.seg.png", "shard/000123", "seg.png"),
        ("000123.jpg", "000123", "jpg"),
        ("a.b/c.d.e", "a.b/c", "d.e"),
        ("README", "README", ""),
        ("dir/.hidden", "dir/.hidden", ""),
    ],
)
def test_split_key_follows_webdataset(name, key, ext):
    assert split_key(name) == (key, ext)


def test_group_webdataset_matches_the_webdataset_library(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(5):
            sample = {"__key__": f"s/{i:06d}", "jpg": GOOD + bytes([i]), "json": b'{"i": %d}' % i, "seg.png": b"p"}
            if i % 2:
                sample["cls"] = b"%d" % i
            sink.write(sample)
    with open(path, "rb") as f:
        ours = [(k, {e: m.data for e, m in g.items()}) for k, g in group_webdataset(iter_tar_members(f, str(path)))]
    theirs = [
        (s["__key__"], {e: v for e, v in s.items() if not e.startswith("__")})
        for s in wds.WebDataset(str(path), shardshuffle=False)
    ]
    assert ours == theirs and len(ours) == 5 and "cls" in ours[1][1]


def _m(name: str) -> TarMember:
    return TarMember(name=name, offset_data=0, size=1, data=b"x", rejected_reason=None)


def test_group_webdataset_non_contiguous_and_repeated_members(caplog):
    names = ["a.jpg", "a.json", "b.jpg", "a.cls", "c.jpg", "c.jpg", "../d.jpg"]
    with caplog.at_level(logging.WARNING, logger="curation.io.tar_stream"):
        groups = [(k, sorted(g)) for k, g in group_webdataset(_m(n) for n in names)]
    assert groups == [
        ("a", ["jpg", "json"]),
        ("b", ["jpg"]),
        ("a", ["cls"]),
        ("c", ["jpg"]),
        ("c", ["jpg"]),
        ("../d", ["jpg"]),
    ]
    assert sum(g for _, g in [(k, len(v)) for k, v in groups]) == len(names)  # nothing dropped
    assert len([r for r in caplog.records if "not contiguous" in r.message]) == 2
    with pytest.raises(ValueError, match="'a' is not contiguous"):
        list(group_webdataset((_m(n) for n in names), strict=True))


# ---------------------------------------------------------------- read_member errors


def test_read_member_rejects_bad_ranges(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes([(info("a.jpg"), GOOD)]))
    with pytest.raises(ValueError, match="offset"):
        read_member(str(path), -1, 3)
    with pytest.raises(ValueError, match="expected 100"):
        read_member(str(path), path.stat().st_size - 10, 100)
    assert read_member(str(path), 512, 0) == b""
