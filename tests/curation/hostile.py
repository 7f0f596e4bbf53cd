"""Generate a corpus of broken and hostile image files (and one hostile tar) with their expected outcomes.

``make_hostile_corpus(directory)`` writes every file into ``directory`` and returns ``{name: expected}`` where
``expected`` is ``"reject:<reason>"`` or ``"ok:RGB WxH"`` (upright size after EXIF orientation). Members of
``evil.tar`` are listed as ``"evil.tar::<member name>"``; the tar's directory member is skipped, not listed.
Nothing binary is committed: every byte is built here from scikit-image sample photos, numpy and zlib.
Pixel facts the tests check are in ``PIXELS``.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BOMB_SIDE", "PIXELS", "corpus_uris", "make_hostile_corpus", "no_writes", "png_bytes", "tar_bytes"]

#: Side of the square 1-bit PNG bomb: 9e8 pixels (~900 MB decoded) in ~110 KB.
BOMB_SIDE = 30_000
W, H = 64, 48
BW_PALETTE = bytes(3) + b"\xff" * 3
#: Known upright pixel values ``{file: [((x, y), (r, g, b), tolerance), ...]}`` after ``load_rgb``.
PIXELS: dict[str, list[tuple[tuple[int, int], tuple[int, int, int], int]]] = {
    "cmyk.jpg": [((8, 24), (255, 0, 0), 6), ((56, 24), (127, 127, 127), 6)],
    "gray16.png": [((0, 0), (0, 0, 0), 0), ((63, 0), (255, 255, 255), 0), ((32, 0), (130, 130, 130), 0)],
    "palette_trns.png": [((5, 24), (255, 255, 255), 0), ((32, 24), (0, 0, 255), 0), ((58, 24), (127, 255, 127), 1)],
    "la.png": [((10, 24), (127, 127, 127), 1), ((50, 24), (200, 200, 200), 0)],
    "rgba.png": [((10, 24), (227, 177, 127), 1), ((50, 24), (10, 20, 30), 0)],
    "animated.gif": [((32, 24), (255, 0, 0), 0)],
    # stored 64x48 with a red top-left quadrant; orientation 6 (rotate 90 deg clockwise) puts it top-right
    "exif_rot6.jpg": [
        ((40, 8), (255, 0, 0), 12),
        ((8, 8), (0, 0, 255), 12),
        ((8, 56), (0, 0, 255), 12),
        ((40, 56), (0, 0, 255), 12),
    ],
    "image.webp": [((0, 0), (0, 0, 0), 0), ((63, 47), (252, 141, 0), 0)],
    "image.tiff": [((0, 0), (0, 0, 0), 0), ((63, 47), (252, 141, 0), 0)],
    "checker_1bit.bmp": [((0, 0), (0, 0, 0), 0), ((8, 0), (255, 255, 255), 0)],
    "png_named.jpg": [((63, 47), (252, 141, 0), 0)],
}


def _chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def png_bytes(
    width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None = None, plte: bytes = b""
) -> bytes:
    """A PNG built by hand; ``rows=None`` streams all-zero rows through zlib without holding them in memory."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    comp = zlib.compressobj(9)
    if rows is None:
        row_bytes = 1 + (width * bit_depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type] + 7) // 8
        block_rows = max(1, min(height, (1 << 20) // row_bytes))
        block = bytes(row_bytes * block_rows)
        parts, left = [], height
        while left:
            n = min(left, block_rows)
            parts.append(comp.compress(block[: n * row_bytes]))
            left -= n
        idat = b"".join(parts) + comp.flush()
    else:
        idat = comp.compress(rows) + comp.flush()
    palette = _chunk(b"PLTE", plte) if plte else b""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + palette + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient() -> Image.Image:
    """64x48 RGB: red rises along x, green along y, blue 0; pixel (63, 47) is (252, 141, 0)."""
    x = np.arange(W, dtype=np.uint16)[None, :] * 4
    y = np.arange(H, dtype=np.uint16)[:, None] * 3
    arr = np.zeros((H, W, 3), np.uint8)
    arr[..., 0] = np.broadcast_to(x, (H, W))
    arr[..., 1] = np.broadcast_to(y, (H, W))
    return Image.fromarray(arr, "RGB")


def _photo_jpeg() -> bytes:
    from skimage import data

    return _encode(Image.fromarray(data.chelsea()), "JPEG", quality=90)


def _cmyk_jpeg() -> bytes:
    arr = np.zeros((H, W, 4), np.uint8)
    arr[:, : W // 2] = (0, 255, 255, 0)  # red
    arr[:, W // 2 :] = (0, 0, 0, 128)  # mid grey
    return _encode(Image.fromarray(arr, "CMYK"), "JPEG", quality=95)


def _gray16_png() -> bytes:
    col = np.round(np.linspace(0, 65535, W)).astype(np.uint16)  # col 32 -> 33290 -> round(33290/257) = 130
    return _encode(Image.fromarray(np.broadcast_to(col, (H, W)).copy()), "PNG")


def _palette_png() -> bytes:
    idx = np.zeros((H, W), np.uint8)
    idx[:, 21:43] = 1
    idx[:, 43:] = 2
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (3 * 253))
    # index 0 fully transparent, 1 opaque, 2 half (128) transparent: green over white -> (127, 255, 127)
    return _encode(im, "PNG", transparency=bytes([0, 255, 128]))


def _la_png() -> bytes:
    arr = np.zeros((H, W, 2), np.uint8)
    arr[:, : W // 2] = (0, 128)  # black at alpha 128 over white -> 127
    arr[:, W // 2 :] = (200, 255)
    return _encode(Image.fromarray(arr, "LA"), "PNG")


def _rgba_png() -> bytes:
    arr = np.zeros((H, W, 4), np.uint8)
    arr[:, : W // 2] = (200, 100, 0, 128)  # over white: 200*128/255 + 255*127/255 = (227, 177, 127)
    arr[:, W // 2 :] = (10, 20, 30, 255)
    return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (W, H), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rot6_jpeg() -> bytes:
    arr = np.zeros((H, W, 3), np.uint8)
    arr[...] = (0, 0, 255)
    arr[: H // 2, : W // 2] = (255, 0, 0)
    im = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(im, "JPEG", quality=95, exif=exif.tobytes())


def _multipage_tiff() -> bytes:
    first = _gradient()
    return _encode(first, "TIFF", compression="tiff_lzw", save_all=True, append_images=[Image.new("RGB", (W, H))])


def _checker_bmp() -> bytes:
    arr = ((np.arange(W)[None, :] // 8 + np.arange(H)[:, None] // 8) % 2 * 255).astype(np.uint8)
    return _encode(Image.fromarray(arr, "L").convert("1"), "BMP")


def _jpeg_then_garbage() -> bytes:
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    garbage = np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes()
    return b"\xff\xd8" + app0 + garbage


def _huge_gif() -> bytes:
    # logical screen 65535 x 65535 with a 2-colour table, then one 1x1 frame (LZW min code size 2)
    screen = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def _corrupt_crc(png: bytes, tag: bytes) -> bytes:
    at = png.index(tag)
    length = struct.unpack(">I", png[at - 4 : at])[0]
    crc_at = at + 4 + length
    out = bytearray(png)
    out[crc_at] ^= 0xFF
    return bytes(out)


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """An uncompressed tar built in memory from ``(TarInfo, data)`` pairs (names kept exactly as given)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mtime = 1_700_000_000
    return info


def _evil_tar(good_jpeg: bytes, good_png: bytes) -> tuple[bytes, dict[str, str]]:
    members = [
        (_info("good/", tarfile.DIRTYPE), None),
        (_info("../evil.jpg"), good_jpeg),
        (_info("/abs.jpg"), good_jpeg),
        (_info("a/../../up.jpg"), good_jpeg),
        (_info("..\\win.jpg"), good_jpeg),
        (_info("link.jpg", tarfile.SYMTYPE, "../../etc/passwd"), None),
        (_info("good/000001.jpg"), good_jpeg),
        (_info("hard.jpg", tarfile.LNKTYPE, "good/000001.jpg"), None),
        (_info("pipe.jpg", tarfile.FIFOTYPE), None),
        (_info("dev.jpg", tarfile.CHRTYPE), None),
        (_info("./good/000002.png"), good_png),
    ]
    expected = {
        "../evil.jpg": "reject:unsafe_member_name",
        "/abs.jpg": "reject:unsafe_member_name",
        "a/../../up.jpg": "reject:unsafe_member_name",
        "..\\win.jpg": "reject:unsafe_member_name",
        "link.jpg": "reject:not_a_regular_file",
        "good/000001.jpg": f"ok:RGB {W}x{H}",
        "hard.jpg": "reject:not_a_regular_file",
        "pipe.jpg": "reject:not_a_regular_file",
        "dev.jpg": "reject:not_a_regular_file",
        "./good/000002.png": f"ok:RGB {W}x{H}",
    }
    return tar_bytes(members), {f"evil.tar::{k}": v for k, v in expected.items()}


def make_hostile_corpus(directory: str | Path) -> dict[str, str]:
    """Write the corpus into ``directory`` (created if needed); return ``{file name: expected outcome}``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    photo = _photo_jpeg()
    gradient_png = _encode(_gradient(), "PNG")
    small_png = _encode(_gradient(), "PNG", compress_level=0)  # stored, so truncation cuts pixel rows
    ok = f"ok:RGB {W}x{H}"
    files: dict[str, tuple[bytes, str]] = {
        "photo.jpg": (photo, "ok:RGB 451x300"),
        "truncated.jpg": (photo[: len(photo) * 6 // 10], "reject:truncated"),
        "truncated.png": (small_png[: len(small_png) // 2], "reject:truncated"),
        "zero.jpg": (b"", "reject:empty"),
        "text.jpg": (b"Just some plain text, certainly not a JPEG.\n" * 20, "reject:not_image"),
        "page.png": (b"<!DOCTYPE html>\n<html><body>404 Not found</body></html>\n", "reject:not_image"),
        "bomb.png": (png_bytes(BOMB_SIDE, BOMB_SIDE, 1, 0), "reject:too_many_pixels"),
        # 1e8 pixels: above max_pixels but below 2x, where Pillow only warns (DecompressionBombWarning)
        "bomb_warn_palette.png": (png_bytes(10_000, 10_000, 1, 3, plte=BW_PALETTE), "reject:too_many_pixels"),
        "badcrc_ihdr.png": (_corrupt_crc(gradient_png, b"IHDR"), "reject:corrupt"),
        "badcrc_idat.png": (_corrupt_crc(gradient_png, b"IDAT"), "reject:corrupt"),
        "gray16.png": (_gray16_png(), ok),
        "cmyk.jpg": (_cmyk_jpeg(), ok),
        "animated.gif": (_animated_gif(), ok),
        "tiny_1x1.png": (_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), "reject:too_small"),
        "palette_trns.png": (_palette_png(), ok),
        "la.png": (_la_png(), ok),
        "rgba.png": (_rgba_png(), ok),
        "exif_rot6.jpg": (_exif_rot6_jpeg(), f"ok:RGB {H}x{W}"),
        "image.tiff": (_multipage_tiff(), ok),
        "image.webp": (_encode(_gradient(), "WEBP", lossless=True), ok),
        "checker_1bit.bmp": (_checker_bmp(), ok),
        "png_named.jpg": (gradient_png, ok),
        "jpeg_garbage.jpg": (_jpeg_then_garbage(), "reject:corrupt"),
        "huge_gif.gif": (_huge_gif(), "reject:too_many_pixels"),
        "icon.ico": (_encode(_gradient(), "ICO", sizes=[(48, 48)]), "reject:unsupported_format"),
    }
    expected = {}
    for name, (payload, outcome) in files.items():
        (out / name).write_bytes(payload)
        expected[name] = outcome
    tar, tar_expected = _evil_tar(_encode(_gradient(), "JPEG", quality=95), gradient_png)
    (out / "evil.tar").write_bytes(tar)
    expected.update(tar_expected)
    return expected


def corpus_uris(directory: str | Path, expected: dict[str, str]) -> dict[str, str]:
    """``expected`` keyed the way ingest records sources: ``<dir>/<file>`` and ``<dir>/evil.tar#<member>``."""
    root = str(directory).rstrip("/")
    out = {}
    for name, outcome in expected.items():
        tar, sep, member = name.partition("::")
        out[f"{root}/{tar}#{member}" if sep else f"{root}/{name}"] = outcome
    return out


_WRITE_EVENTS = {"os.mkdir", "os.symlink", "os.link", "os.rename", "os.remove", "os.rmdir", "os.chmod", "os.utime"}
_AUDIT: dict[str, list | None] = {"log": None, "installed": None}


def _audit(event: str, args: tuple) -> None:
    log = _AUDIT["log"]
    if log is None:
        return
    if event == "open":
        mode, flags = (args[1] if len(args) > 1 else "r"), (args[2] if len(args) > 2 else 0)
        writes = isinstance(mode, str) and any(c in mode for c in "wax+")
        writes |= isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes:
            log.append((event, args[0]))
    elif event in _WRITE_EVENTS:
        log.append((event, args[0] if args else None))


@contextlib.contextmanager
def no_writes() -> Iterator[list]:
    """Record every filesystem write (open for writing, mkdir, link, rename, ...) the process attempts inside.

    Uses a ``sys.addaudithook`` hook (installed once, inert outside this block); yields the event list.
    """
    if _AUDIT["installed"] is None:
        sys.addaudithook(_audit)
        _AUDIT["installed"] = []
    _AUDIT["log"] = events = []
    try:
        yield events
    finally:
        _AUDIT["log"] = None
