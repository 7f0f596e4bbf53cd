"""Stream tar / WebDataset shards member by member without extracting anything, and re-read members by offset.

Member names are data, never paths: nothing here opens, creates or links a file named after a member.
``iter_tar_members`` reads a tar (plain, gzip, bzip2 or xz, detected from the bytes) from any readable file
object in stream mode, so memory stays flat whatever the shard size, and yields one ``TarMember`` per member:

- regular files up to ``max_member_bytes``: ``data`` holds the bytes, ``rejected_reason`` is None;
- ``rejected_reason="unsafe_member_name"``: absolute names (``/x``, ``\\x``, ``C:x``), any ``..`` component
  (``/`` and ``\\`` both count as separators), empty names or names with NUL;
- ``rejected_reason="not_a_regular_file"``: symlinks, hard links, character/block devices, FIFOs and any other
  non-regular type (their targets are never followed);
- ``rejected_reason="too_large_file"``: bigger than ``max_member_bytes``; skipped block by block, never held;
- directories are skipped silently (they carry no data).

pax and GNU long-name metadata headers above ``MAX_METADATA_BYTES`` are damage (Python's tarfile would read any
declared size into memory, so a few-KB ``.tar.gz`` could ask for gigabytes).

A damaged archive raises ``TarStreamError`` after the members read so far were yielded: broken compression,
truncated data, an invalid header midway or a missing end-of-archive block (the last two are a silent early end
in Python's stream-mode ``tarfile``; here they are errors, so a cut shard never passes as a short one).

``offset_data`` is the member's data offset in the *uncompressed* tar stream: ``read_member(uri, offset_data,
size)`` fetches it again by byte range (plain tar) or by decompressing up to it (compressed tar; the cost grows
with the offset). ``group_webdataset`` groups members into WebDataset samples.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import logging
import lzma
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import fsspec

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "MAX_METADATA_BYTES",
    "MEMBER_REASONS",
    "TarMember",
    "TarStreamError",
    "group_webdataset",
    "iter_tar_members",
    "read_member",
    "split_key",
    "unsafe_name_reason",
]

log = logging.getLogger(__name__)

#: Same as ``DecodeLimits.max_file_bytes``: 50 MiB.
DEFAULT_MAX_MEMBER_BYTES = 50 * 1024 * 1024
#: Reasons a member can be rejected with.
MEMBER_REASONS = ("unsafe_member_name", "not_a_regular_file", "too_large_file")
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
_TYPE_NAMES = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass(frozen=True)
class TarMember:
    """One tar member: its bytes when usable, otherwise why not."""

    name: str
    """The name exactly as stored in the archive (data for lineage, never used as a path)."""
    offset_data: int
    """Offset of the member's data in the uncompressed tar stream (see ``read_member``)."""
    size: int
    """Size in bytes declared by the header (0 for links and devices)."""
    data: bytes | None
    """The member's bytes for accepted regular files, else None."""
    rejected_reason: str | None
    """None, or one of ``MEMBER_REASONS``."""
    detail: str = ""
    """Human explanation of the rejection."""
    offset: int = 0
    """Offset of the member's header block in the uncompressed stream."""
    compression: str | None = None
    """``gzip``/``bz2``/``xz`` when the archive is compressed (offsets then refer to the decompressed stream)."""


#: Largest pax / GNU long-name metadata header accepted; tarfile would read any declared size into memory.
MAX_METADATA_BYTES = 1 << 20
_METADATA_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                   tarfile.GNUTYPE_LONGLINK)  # fmt: skip


class _GuardedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized metadata headers before tarfile reads them whole (a tiny .tar.gz can
    declare a multi-GB pax header of zeros)."""

    def _proc_member(self, tarfile_obj: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _METADATA_TYPES and self.size > MAX_METADATA_BYTES:
            raise tarfile.HeaderError(
                f"metadata header {self.type!r} declares {self.size} bytes > {MAX_METADATA_BYTES}"
            )
        return super()._proc_member(tarfile_obj)


class TarStreamError(ValueError):
    """The archive itself is damaged or unsupported; ``members_read`` were yielded before the failure."""

    def __init__(self, source_uri: str, members_read: int, detail: str) -> None:
        super().__init__(f"{source_uri}: damaged or unsupported tar after {members_read} members: {detail}")
        self.source_uri = source_uri
        self.members_read = members_read
        self.detail = detail


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` could escape a directory if it were ever used as a path (None when it could not)."""
    if not name:
        return "empty name"
    if "\x00" in name:
        return "NUL in name"
    if name.startswith(("/", "\\")) or (len(name) >= 2 and name[1] == ":" and name[0].isalpha()):
        return "absolute name"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' component"
    return None


class _Prefixed:
    """A read-only stream that replays ``head`` before the rest of ``raw`` (the bytes sniffed for compression)."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head = head
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._raw.read(size)
        if size is None or size < 0:
            out, self._head = self._head + self._raw.read(), b""
            return out
        out, self._head = self._head[:size], self._head[size:]
        if len(out) < size:
            out += self._raw.read(size - len(out))
        return out


class _Tail:
    """Passes reads through while remembering the latest bytes, so the block where tarfile stopped can be checked.

    Python's stream-mode tarfile ends silently on an invalid header after the first member; looking at the
    block it stopped on tells a proper end (a zero block) from damage.
    """

    def __init__(self, raw: BinaryIO, keep: int = 1 << 16) -> None:
        self._raw = raw
        self._keep = keep
        self._buf = bytearray()
        self._start = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._buf += data
        if len(self._buf) > 2 * self._keep:
            drop = len(self._buf) - self._keep
            del self._buf[:drop]
            self._start += drop
        return data

    def block(self, offset: int) -> bytes:
        """The (up to) 512 bytes at stream ``offset`` if they were read recently, else ``b""``."""
        i = offset - self._start
        return bytes(self._buf[i : i + tarfile.BLOCKSIZE]) if i >= 0 else b""


def _sniff_compression(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def _decompressed(raw: BinaryIO, compression: str | None) -> BinaryIO:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(raw, mode="rb")
    if compression == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


def iter_tar_members(
    fileobj: BinaryIO, source_uri: str, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[TarMember]:
    """Yield every non-directory member of the tar in ``fileobj`` (see module docstring); writes nothing."""
    if isinstance(max_member_bytes, bool) or not isinstance(max_member_bytes, int) or max_member_bytes < 1:
        raise ValueError(f"max_member_bytes must be a positive integer, got {max_member_bytes!r}")
    head = fileobj.read(6)
    compression = _sniff_compression(head)
    if compression == "zstd":
        raise TarStreamError(source_uri, 0, "zstd-compressed tar is not supported; recompress with gzip or none")
    tail = _Tail(_decompressed(_Prefixed(head, fileobj), compression))  # type: ignore[arg-type]
    count = 0
    try:
        tf = tarfile.open(fileobj=tail, mode="r|", tarinfo=_GuardedTarInfo)  # noqa: SIM115 - closed by `with tf`
    except Exception as exc:  # any failure of the archive layers (tar, gzip, bz2, xz) is damage
        raise TarStreamError(source_uri, 0, f"{type(exc).__name__}: {exc}") from None
    with tf:
        while True:
            try:
                info = tf.next()
            except Exception as exc:
                raise TarStreamError(source_uri, count, f"{type(exc).__name__}: {exc}") from None
            if info is None:
                _check_end(tail, tf.offset, source_uri, count)
                return
            tf.members.clear()  # stream mode appends every header to this list: keep memory flat on big shards
            if info.isdir():
                continue
            base = dict(name=info.name, offset_data=info.offset_data, offset=info.offset, compression=compression)
            count += 1
            reason = unsafe_name_reason(info.name)
            if reason is not None:
                yield TarMember(**base, size=info.size, data=None, rejected_reason="unsafe_member_name", detail=reason)
            elif not info.isreg():
                kind = _TYPE_NAMES.get(info.type, f"tar type {info.type!r}")
                detail = f"{kind}" + (f" -> {info.linkname!r}" if info.linkname else "")
                yield TarMember(**base, size=info.size, data=None, rejected_reason="not_a_regular_file", detail=detail)
            elif info.size > max_member_bytes:
                detail = f"{info.size} bytes > max_member_bytes={max_member_bytes} (skipped unread)"
                yield TarMember(**base, size=info.size, data=None, rejected_reason="too_large_file", detail=detail)
            else:
                yield TarMember(
                    **base, size=info.size, data=_read_data(tf, info, source_uri, count), rejected_reason=None
                )


def _check_end(tail: _Tail, offset: int, source_uri: str, count: int) -> None:
    block = tail.block(offset)
    if len(block) < tarfile.BLOCKSIZE:
        raise TarStreamError(source_uri, count, f"archive ends at offset {offset} without end-of-archive blocks")
    if block.count(0) != tarfile.BLOCKSIZE:
        raise TarStreamError(source_uri, count, f"invalid member header at offset {offset}")


def _read_data(tf: tarfile.TarFile, info: tarfile.TarInfo, source_uri: str, count: int) -> bytes:
    try:
        member = tf.extractfile(info)
        assert member is not None  # regular files always have a file object
        data = member.read()
    except Exception as exc:  # any failure of the archive layers (tar, gzip, bz2, xz) is damage
        raise TarStreamError(source_uri, count - 1, f"{info.name!r}: {type(exc).__name__}: {exc}") from None
    if len(data) != info.size:
        raise TarStreamError(source_uri, count - 1, f"{info.name!r}: {len(data)} of {info.size} bytes present")
    return data


def split_key(name: str) -> tuple[str, str]:
    """WebDataset ``(key, ext)``: key is the directory plus the basename up to its first dot.

    ``"shard/000123.seg.png"`` -> ``("shard/000123", "seg.png")``. A basename without a dot (or starting with
    one) has no extension: ``(name, "")``.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return name, ""
    return name[: len(name) - len(base)] + stem, ext


def group_webdataset(
    members: Iterable[TarMember], *, strict: bool = False
) -> Iterator[tuple[str, dict[str, TarMember]]]:
    """Group consecutive members sharing a WebDataset key into ``(key, {ext: member})`` samples.

    Rejected members stay in their sample (the caller records them), so nothing is lost. A key that
    reappears after other keys, or an extension repeated within a sample, starts a new sample with the same key
    and logs a warning; with ``strict=True`` it raises ``ValueError`` instead (WebDataset requires a sample's
    files to be contiguous and unique).
    """
    key: str | None = None
    group: dict[str, TarMember] = {}
    seen: set[str] = set()
    for member in members:
        k, ext = split_key(member.name)
        if group and (k != key or ext in group):
            assert key is not None
            yield key, group
            seen.add(key)
            group = {}
        if not group:
            if k in seen:
                problem = f"sample key {k!r} is not contiguous or repeats {member.name!r}"
                if strict:
                    raise ValueError(f"{problem}; write each sample's files next to each other, once")
                log.warning("%s: yielding it as a further sample", problem)
            key = k
        group[ext] = member
    if group:
        assert key is not None
        yield key, group


@functools.lru_cache(maxsize=4096)
def _archive_compression(uri: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(uri)
    return _sniff_compression(fs.cat_file(path, start=0, end=6))


def read_member(uri: str, offset: int, size: int) -> bytes:
    """Re-read ``size`` bytes at ``offset_data`` of a member of the tar at ``uri`` (any fsspec URL).

    Plain tars are read by byte range; compressed ones (detected from their first bytes, cached per URI: archives
    are treated as immutable) are decompressed up to the offset, so random access into them costs O(offset).
    Raises ``ValueError`` when the archive holds fewer bytes than asked for.
    """
    for name, value in (("offset", offset), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"read_member: {name} must be a non-negative integer, got {value!r}")
    compression = _archive_compression(uri)
    if compression == "zstd":
        raise ValueError(f"read_member: {uri} is zstd-compressed, which is not supported")
    if size == 0:
        return b""
    if compression is None:
        fs, path = fsspec.core.url_to_fs(uri)
        data = fs.cat_file(path, start=offset, end=offset + size)
    else:
        with fsspec.open(uri, "rb", compression=compression) as f:
            f.seek(offset)
            data = f.read(size)
    if len(data) != size:
        raise ValueError(f"read_member: {uri} has {len(data)} bytes at offset {offset}, expected {size}")
    return data
