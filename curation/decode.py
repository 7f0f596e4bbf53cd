"""Robust single-image inspection and RGB loading for hostile inputs.

``inspect_image(data, limits)`` answers "is this a usable image?" with an ``ImageInfo`` or a ``Rejected``;
``load_rgb(data, limits)`` returns the decoded RGB picture or raises ``DecodeError``; ``decode_rgb`` returns both.
Nothing here ever raises for bad *data* other than ``DecodeError`` (a ``ValueError``), and no warning escapes.

Checks, in order (the first failure is the reason):

====================  ====================================================================================
reason                meaning
====================  ====================================================================================
``empty``             zero bytes
``too_large_file``    more than ``DecodeLimits.max_file_bytes`` bytes
``not_image``         the magic bytes match no image format (text, HTML, archives, ...)
``unsupported_format`` a known image format (ICO, PSD, HEIC/AVIF, JPEG 2000, JPEG XL, SVG, PDF, PNM, ...)
                      or an image format left out of ``DecodeLimits.allow_formats``
``too_many_pixels``   header width x height above ``max_pixels`` (decompression bomb): refused from the header
                      alone, before any pixel is decoded; Pillow's own ``DecompressionBombError`` and
                      ``DecompressionBombWarning`` (its process-wide ``Image.MAX_IMAGE_PIXELS``) map here too
``too_small``         shorter side below ``min_side`` (from the header, before decoding)
``truncated``         the data stops before the image does (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set)
``corrupt``           anything else Pillow cannot parse or decode: bad chunk CRC (PNG files are CRC-verified
                      chunk by chunk), broken markers, malformed headers, decoder errors
``unsupported_mode``  decodes, but to a pixel mode with no faithful RGB meaning (e.g. float ``F``, ``LAB``)
====================  ====================================================================================

Conversions to RGB (``ImageInfo.conversion`` names the one applied; the frame is always fully decoded):

- EXIF orientation 2..8 is applied (``ImageInfo.width/height`` are the oriented size).
- ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV`` -> plain Pillow conversion (CMYK naively, no ICC).
- 16-bit ``I;16*`` and 32-bit ``I`` (Pillow's mode for some 16-bit files) -> 8 bit as ``round(v / 257)``
  (``I`` is clipped to 0..65535 first). Pillow's own ``convert("L")`` would clip every value above 255.
- Anything with alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, or a ``transparency`` entry
  on ``P``/``L``/``RGB``) -> composited over opaque white, the usual background for web images.
- Multi-frame files (animated GIF/PNG/WebP, multi-page TIFF, MPO) -> the first frame.

``inspect_image`` verifies JPEGs by decoding at 1/8 scale when ``fast_jpeg_verify`` is on: libjpeg still reads
every entropy-coded segment, so truncation and broken markers are found, at a fraction of the IDCT cost.

Warnings raised by Pillow are captured (never printed) with ``warnings.catch_warnings``, which swaps process-wide
state: call these functions from one thread per process (Ray tasks and actors do).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile

__all__ = [
    "FORMATS",
    "REASONS",
    "DecodeError",
    "DecodeLimits",
    "ImageInfo",
    "Rejected",
    "decode_rgb",
    "inspect_image",
    "load_rgb",
    "sniff_format",
]

log = logging.getLogger(__name__)

#: Every reason code ``inspect_image`` / ``DecodeError`` can carry.
REASONS = (
    "empty",
    "too_large_file",
    "not_image",
    "unsupported_format",
    "too_many_pixels",
    "too_small",
    "truncated",
    "corrupt",
    "unsupported_mode",
)
#: Image formats that can be decoded, by our lowercase name -> Pillow plugin name.
FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}
_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
#: EXIF orientation tag value -> the transpose that makes the picture upright.
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PLAIN_MODES = ("1", "L", "P", "CMYK", "YCbCr", "RGBX", "HSV")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(kw_only=True)
class DecodeLimits:
    """What a usable image is; defaults suit web-scale pretraining data."""

    min_side: int = 32
    """Shorter side in pixels below which an image is rejected ``too_small``: icons, spacers and tracking pixels
    carry nothing for 224-px training crops. 32 keeps CIFAR-sized pictures; lower it for 28-px MNIST-like data."""
    max_pixels: int = 89_478_485
    """Largest width x height accepted, read from the header before decoding (Pillow's default bomb limit,
    ~9459 x 9459, about 256 MiB as RGB). Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` is a second ceiling."""
    max_file_bytes: int = 50 * 1024 * 1024
    """Largest encoded size in bytes accepted (50 MiB); bigger files are rejected ``too_large_file`` unread."""
    allow_formats: tuple[str, ...] = ("jpeg", "png", "webp", "bmp", "tiff", "gif")
    """Formats accepted (subset of jpeg, png, webp, bmp, tiff, gif; ``jpg``/``tif`` are aliases). Others are
    rejected ``unsupported_format``. The format is taken from the bytes, never from the file name."""
    fast_jpeg_verify: bool = True
    """``inspect_image`` decodes JPEGs at 1/8 scale to verify them (every byte is still entropy-decoded)."""

    def __post_init__(self) -> None:
        for name in ("min_side", "max_pixels", "max_file_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeLimits.{name} must be a positive integer, got {value!r}")
        if self.min_side * self.min_side > self.max_pixels:
            raise ValueError(
                f"DecodeLimits.min_side={self.min_side} squared exceeds max_pixels={self.max_pixels}: "
                "no image could pass; lower min_side or raise max_pixels"
            )
        if isinstance(self.allow_formats, str) or not self.allow_formats:
            raise ValueError(
                f"DecodeLimits.allow_formats must be a non-empty list of formats, got {self.allow_formats!r}"
            )
        normalised = []
        for fmt in self.allow_formats:
            name = _ALIASES.get(str(fmt).lower(), str(fmt).lower())
            if name not in FORMATS:
                raise ValueError(f"DecodeLimits.allow_formats: {fmt!r} is not one of {sorted(FORMATS)}")
            if name not in normalised:
                normalised.append(name)
        self.allow_formats = tuple(normalised)
        if not isinstance(self.fast_jpeg_verify, bool):
            raise ValueError(f"DecodeLimits.fast_jpeg_verify must be true or false, got {self.fast_jpeg_verify!r}")


@dataclass(frozen=True)
class ImageInfo:
    """A usable image: oriented size, what it was, and how it becomes RGB."""

    width: int
    height: int
    format: str
    mode: str
    n_frames: int
    orientation: int = 1
    conversion: str = ""
    num_bytes: int = 0

    @property
    def converted(self) -> bool:
        """True when the pixels needed more than decoding to become RGB (``conversion`` says what)."""
        return bool(self.conversion)


@dataclass(frozen=True)
class Rejected:
    """An unusable input: ``reason`` is one of ``REASONS``, ``detail`` is for humans."""

    reason: str
    detail: str


class DecodeError(ValueError):
    """Bad image data; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sniff_format(data: bytes) -> str | None:
    """Name the image format from magic bytes (``jpeg``..., or an unsupported one such as ``ico``), else None."""
    head = bytes(data[:64])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) >= 22:
        return "ico"
    if head[:4] == b"8BPS":
        return "psd"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"avis"):
        return "heif"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "jxl"
    if head[:4] in (b"qoif", b"DDS ", b"icns") or head.startswith(b"gimp xcf"):
        return head[:4].decode("ascii").strip().lower()
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"%!PS"):
        return "eps"
    if head.startswith(b"v/1\x01"):
        return "exr"
    if len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n#":
        return "pnm"
    text = bytes(data[:1024]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "svg"
    return None


def inspect_image(data: bytes, limits: DecodeLimits) -> ImageInfo | Rejected:
    """Check ``data`` is a usable image (header limits, then a full decode of the first frame) without raising."""
    try:
        info, _ = _decode(data, limits, want_image=False, draft_size=None)
    except DecodeError as exc:
        return Rejected(exc.reason, exc.detail)
    return info


def load_rgb(data: bytes, limits: DecodeLimits, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``data`` to an upright RGB image (see module docstring); raise ``DecodeError`` on bad data.

    ``draft_size=(w, h)`` lets big JPEGs decode at a DCT scale (1/2, 1/4, 1/8) that keeps the result at least
    ``w x h`` in upright orientation; other formats decode at full size.
    """
    return decode_rgb(data, limits, draft_size)[1]


def decode_rgb(
    data: bytes, limits: DecodeLimits, draft_size: tuple[int, int] | None = None
) -> tuple[ImageInfo, Image.Image]:
    """``inspect_image`` and ``load_rgb`` in one decode: ``(info, rgb_image)``; raise ``DecodeError``."""
    bad = lambda v: isinstance(v, bool) or not isinstance(v, int) or v < 1  # noqa: E731
    if draft_size is not None and (len(draft_size) != 2 or any(bad(v) for v in draft_size)):
        raise ValueError(f"draft_size must be two positive integers (width, height), got {draft_size!r}")
    info, image = _decode(data, limits, want_image=True, draft_size=draft_size)
    assert image is not None
    return info, image


def _decode(
    data: bytes, limits: DecodeLimits, *, want_image: bool, draft_size: tuple[int, int] | None
) -> tuple[ImageInfo, Image.Image | None]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated files would pass as images")
    if len(data) == 0:
        raise DecodeError("empty", "zero bytes")
    if len(data) > limits.max_file_bytes:
        raise DecodeError("too_large_file", f"{len(data)} bytes > max_file_bytes={limits.max_file_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("not_image", f"no image signature; starts with {bytes(data[:16])!r}")
    if fmt not in limits.allow_formats:
        where = "not decodable here" if fmt not in FORMATS else "not in allow_formats"
        raise DecodeError("unsupported_format", f"{fmt} ({where})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _decode_known(bytes(data), fmt, limits, want_image, draft_size, caught)
        except DecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise DecodeError("too_many_pixels", f"Pillow refused it: {exc}") from None
        except Exception as exc:  # hostile data reaches odd corners of the plugins: never let it escape
            raise DecodeError(_classify(exc), f"{fmt}: {type(exc).__name__}: {exc}") from None
        finally:
            for w in caught:
                log.debug("pillow warning on %s input: %s", fmt, w.message)


def _classify(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "truncated"
    text = str(exc).lower()
    if "truncated" in text or "unexpected end" in text or "premature end" in text:
        return "truncated"
    return "corrupt"


def _bomb_warned(caught: list[warnings.WarningMessage]) -> str | None:
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            return str(w.message)
    return None


def _decode_known(
    data: bytes,
    fmt: str,
    limits: DecodeLimits,
    want_image: bool,
    draft_size: tuple[int, int] | None,
    caught: list[warnings.WarningMessage],
) -> tuple[ImageInfo, Image.Image | None]:
    plugin = [FORMATS[fmt]]
    try:
        im = Image.open(io.BytesIO(data), formats=plugin)
    except Image.UnidentifiedImageError:
        raise DecodeError("corrupt", f"{fmt} signature but Pillow cannot parse the header") from None
    bomb = _bomb_warned(caught)
    width, height = im.size
    if bomb is not None:
        raise DecodeError("too_many_pixels", f"{width}x{height}: above Pillow's Image.MAX_IMAGE_PIXELS ({bomb})")
    if width * height > limits.max_pixels:
        raise DecodeError(
            "too_many_pixels", f"{width}x{height} = {width * height} pixels > max_pixels={limits.max_pixels}"
        )
    if width < 1 or height < 1:
        raise DecodeError("corrupt", f"header size {width}x{height}")
    if min(width, height) < limits.min_side:
        raise DecodeError("too_small", f"{width}x{height}: shorter side < min_side={limits.min_side}")
    mode = im.mode
    if fmt == "png":  # Pillow checks header-chunk CRCs at open but not IDAT ones at load: verify() reads them all
        Image.open(io.BytesIO(data), formats=plugin).verify()
    orientation = _orientation(im) if fmt == "jpeg" else 1
    if fmt == "jpeg" and draft_size is not None:
        want = draft_size[::-1] if orientation in (5, 6, 7, 8) else draft_size
        im.draft("RGB", tuple(want))
    elif fmt == "jpeg" and not want_image and limits.fast_jpeg_verify:
        im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
    im.load()
    if fmt != "jpeg":
        orientation = _orientation(im)
    rgb, conversion = _to_rgb(im, full=want_image)
    if rgb is not None and orientation in _ORIENT:
        rgb = rgb.transpose(_ORIENT[orientation])
    n_frames = _n_frames(im)
    if n_frames > 1:
        conversion = "; ".join(x for x in (conversion, f"first of {n_frames} frames") if x)
    out_w, out_h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    info = ImageInfo(
        width=out_w,
        height=out_h,
        format=fmt,
        mode=mode,
        n_frames=n_frames,
        orientation=orientation,
        conversion=conversion,
        num_bytes=len(data),
    )
    return info, rgb


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception as exc:  # broken EXIF must not cost the picture
        log.debug("unreadable EXIF ignored: %s", exc)
        return 1
    return value if isinstance(value, int) and value in range(1, 9) else 1


def _n_frames(im: Image.Image) -> int:
    try:
        return max(1, int(getattr(im, "n_frames", 1)))
    except Exception as exc:  # later frames may be broken; the first one decoded fine
        log.debug("frame count unavailable: %s", exc)
        return 1


def _to_rgb(im: Image.Image, *, full: bool) -> tuple[Image.Image | None, str]:
    """Convert a loaded frame to RGB; with ``full=False`` only prove that the conversion exists."""
    mode = im.mode
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info)
    if mode == "RGB" and not has_alpha:
        return (im if full else None), ""
    if mode in _SIXTEEN_BIT:
        note = f"{mode}->RGB (16-bit scaled round(v/257))"
        if not full:
            return None, note
        arr = np.asarray(im)
        if mode == "I":
            arr = np.clip(arr, 0, 65535)
        gray = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB"), note
    if has_alpha:
        note = f"{mode}{'+transparency' if mode not in _ALPHA_MODES else ''}->RGB (alpha composited on white)"
        if not full:
            return None, note
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), note
    note = f"{mode}->RGB"
    if mode in _PLAIN_MODES:
        return (im.convert("RGB") if full else None), note
    if mode in ("F", "LAB") or mode.startswith(("I;16S", "I;32")):
        raise DecodeError("unsupported_mode", f"mode {mode} has no faithful 8-bit RGB meaning")
    try:  # other exotic modes: only accept what Pillow can convert
        out = (im if full else im.crop((0, 0, 1, 1))).convert("RGB")
    except ValueError as exc:
        raise DecodeError("unsupported_mode", f"mode {mode} has no RGB conversion ({exc})") from None
    return (out if full else None), note
