"""curation.decode: limits validation, reason codes, RGB conversions with exact pixels, orientation, draft, fuzz."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from curation.decode import (
    REASONS,
    DecodeError,
    DecodeLimits,
    ImageInfo,
    Rejected,
    decode_rgb,
    inspect_image,
    load_rgb,
    sniff_format,
)
from pretrain.utils.config import build

NATURE = sorted(Path("/usr/share/backgrounds/mate/nature").glob("*.jpg"))
ANY = DecodeLimits(min_side=1)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def astronaut_jpeg() -> bytes:
    from skimage import data

    return encode(Image.fromarray(data.astronaut()), "JPEG", quality=90)


def outcome(result: ImageInfo | Rejected) -> str:
    return f"reject:{result.reason}" if isinstance(result, Rejected) else f"ok:{result.width}x{result.height}"


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_side": 0}, "min_side"),
        ({"max_pixels": -5}, "max_pixels"),
        ({"max_file_bytes": True}, "max_file_bytes"),
        ({"min_side": 100, "max_pixels": 9999}, "min_side"),
        ({"allow_formats": ("jpeg", "xcf")}, "allow_formats"),
        ({"allow_formats": ()}, "allow_formats"),
        ({"allow_formats": "jpeg"}, "allow_formats"),
        ({"fast_jpeg_verify": "yes"}, "fast_jpeg_verify"),
    ],
)
def test_limits_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DecodeLimits.{field}"):
        DecodeLimits(**kwargs)


def test_limits_defaults_aliases_and_toml_build():
    lim = DecodeLimits()
    assert (lim.min_side, lim.max_pixels, lim.max_file_bytes) == (32, 89_478_485, 50 * 1024 * 1024)
    assert lim.allow_formats == ("jpeg", "png", "webp", "bmp", "tiff", "gif")
    assert DecodeLimits(allow_formats=("JPG", "tif", "jpeg")).allow_formats == ("jpeg", "tiff")
    built = build(DecodeLimits, {"min_side": 64, "allow_formats": ["png", "webp"]})
    assert built.allow_formats == ("png", "webp") and built.min_side == 64
    with pytest.raises(TypeError):
        DecodeLimits(64)  # kw_only


# ---------------------------------------------------------------- reasons


def test_sniff_format_by_magic_bytes_not_names():
    gradient = Image.new("RGB", (40, 40), (1, 2, 3))
    assert sniff_format(encode(gradient, "JPEG")) == "jpeg"
    assert sniff_format(encode(gradient, "PNG")) == "png"
    assert sniff_format(encode(gradient, "GIF")) == "gif"
    assert sniff_format(encode(gradient, "WEBP")) == "webp"
    assert sniff_format(encode(gradient, "BMP")) == "bmp"
    assert sniff_format(encode(gradient, "TIFF")) == "tiff"
    assert sniff_format(encode(gradient, "ICO")) == "ico"
    assert sniff_format(encode(gradient, "PPM")) == "pnm"
    assert sniff_format(encode(gradient, "PDF")) == "pdf"
    assert sniff_format(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>') == "svg"
    assert sniff_format(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00") == "heif"
    assert sniff_format(b"<html><body>hi</body></html>") is None
    assert sniff_format(b"BM") is None  # too short to be a bitmap


def test_reason_codes_for_basic_failures():
    photo = astronaut_jpeg()
    cases = {
        "empty": (b"", DecodeLimits()),
        "too_large_file": (photo, DecodeLimits(max_file_bytes=len(photo) - 1)),
        "not_image": (b"%%% definitely not an image %%%" * 10, DecodeLimits()),
        "unsupported_format": (encode(Image.new("RGB", (64, 64)), "PNG"), DecodeLimits(allow_formats=("jpeg",))),
        "too_many_pixels": (photo, DecodeLimits(max_pixels=512 * 512 - 1)),
        "too_small": (photo, DecodeLimits(min_side=513)),
        "truncated": (photo[: len(photo) // 3], DecodeLimits()),
    }
    for reason, (data, limits) in cases.items():
        result = inspect_image(data, limits)
        assert isinstance(result, Rejected) and result.reason == reason, (reason, result)
        assert result.detail
        with pytest.raises(DecodeError) as err:
            load_rgb(data, limits)
        assert err.value.reason == reason and isinstance(err.value, ValueError)
    assert set(cases) <= set(REASONS)
    assert outcome(inspect_image(photo, DecodeLimits(max_file_bytes=len(photo), max_pixels=512 * 512))) == "ok:512x512"


@pytest.mark.parametrize("fast", [True, False])
def test_truncated_jpeg_detected_at_every_cut_with_and_without_fast_verify(fast):
    photo = astronaut_jpeg()
    limits = DecodeLimits(fast_jpeg_verify=fast)
    for frac in (0.2, 0.5, 0.8, 0.95, 0.995):
        result = inspect_image(photo[: int(len(photo) * frac)], limits)
        assert isinstance(result, Rejected) and result.reason == "truncated", (frac, result)
    assert isinstance(inspect_image(photo, limits), ImageInfo)


def test_missing_end_markers_are_truncation_but_trailing_bytes_are_tolerated():
    photo = astronaut_jpeg()
    png = encode(Image.new("RGB", (64, 64), (3, 4, 5)), "PNG")
    assert photo.endswith(b"\xff\xd9") and png.endswith(b"IEND\xaeB`\x82")
    for data in (photo[:-2], photo[:-1], png[:-12]):
        assert outcome(inspect_image(data, DecodeLimits())) == "reject:truncated"
    assert outcome(inspect_image(photo + b"trailing junk", DecodeLimits())) == "ok:512x512"
    assert outcome(inspect_image(png + b"trailing junk", DecodeLimits())) == "ok:64x64"


def test_real_photos_inspect_and_load_consistently():
    for path in NATURE[:3]:
        data = path.read_bytes()
        info = inspect_image(data, DecodeLimits())
        assert isinstance(info, ImageInfo) and info.format == "jpeg" and info.n_frames == 1
        with Image.open(path) as ref:
            assert (info.width, info.height) == ref.size
        small = load_rgb(data, DecodeLimits(), draft_size=(224, 224))
        assert small.mode == "RGB" and min(small.size) >= 224 and small.size[0] < info.width


def test_draft_size_picks_dct_scale_and_keeps_requested_size():
    photo = astronaut_jpeg()
    assert load_rgb(photo, ANY, draft_size=(100, 100)).size == (128, 128)
    assert load_rgb(photo, ANY, draft_size=(200, 100)).size == (256, 256)
    assert load_rgb(photo, ANY, draft_size=(600, 600)).size == (512, 512)
    info, full = decode_rgb(photo, ANY)
    assert full.size == (512, 512) and (info.width, info.height) == (512, 512)
    png = encode(Image.new("RGB", (300, 200), (9, 9, 9)), "PNG")
    assert load_rgb(png, ANY, draft_size=(10, 10)).size == (300, 200)  # draft is a JPEG-only shortcut
    with pytest.raises(ValueError, match="draft_size"):
        load_rgb(photo, ANY, draft_size=(0, 10))


# ---------------------------------------------------------------- conversions


def test_sixteen_bit_png_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535, 65279, 128]], dtype=np.uint16).repeat(2, axis=0)
    data = encode(Image.fromarray(values), "PNG")
    info, rgb = decode_rgb(data, ANY)
    assert info.mode == "I;16" and info.converted and "257" in info.conversion
    arr = np.asarray(rgb)
    assert arr.shape == (2, 6, 3) and (arr[..., 0] == arr[..., 2]).all()
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255, 254, 0]


def test_thirty_two_bit_int_tiff_scaled_as_sixteen_bit_and_clipped():
    values = np.array([[0, 65535, 100000, -5, 257 * 10]], dtype=np.int32).repeat(2, axis=0)
    rgb = load_rgb(encode(Image.fromarray(values, "I"), "TIFF"), ANY)
    assert np.asarray(rgb)[0, :, 1].tolist() == [0, 255, 255, 0, 10]


def test_float_tiff_is_unsupported_mode():
    data = encode(Image.fromarray(np.ones((40, 40), np.float32)), "TIFF")
    result = inspect_image(data, DecodeLimits())
    assert isinstance(result, Rejected) and result.reason == "unsupported_mode"


def test_transparency_entries_on_rgb_and_l_are_composited_on_white():
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:, 20:] = (10, 20, 30)
    rgb_trns = encode(Image.fromarray(arr), "PNG", transparency=(0, 0, 0))
    out = np.asarray(load_rgb(rgb_trns, DecodeLimits()))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 39].tolist() == [10, 20, 30]
    gray = np.full((40, 40), 7, np.uint8)
    gray[:, 20:] = 99
    l_trns = encode(Image.fromarray(gray), "PNG", transparency=7)
    info, rgb = decode_rgb(l_trns, DecodeLimits())
    assert info.mode == "L" and "composited on white" in info.conversion
    assert np.asarray(rgb)[0, 0].tolist() == [255] * 3 and np.asarray(rgb)[0, 39].tolist() == [99] * 3


def test_animated_webp_and_apng_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in ((0, 200, 0), (200, 0, 0))]
    for fmt in ("WEBP", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True, duration=50)
        info, rgb = decode_rgb(data, DecodeLimits())
        assert info.n_frames == 2 and "first of 2 frames" in info.conversion, fmt
        assert rgb.getpixel((20, 20)) == (0, 200, 0), fmt


EXPECTED_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),  # 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(EXPECTED_ORIENT))
def test_every_exif_orientation_gives_the_upright_pixels(orientation):
    stored = np.random.default_rng(orientation).integers(0, 255, (3, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    info, rgb = decode_rgb(data, ANY)
    want = EXPECTED_ORIENT[orientation](stored)
    assert info.orientation == orientation and (info.width, info.height) == (want.shape[1], want.shape[0])
    assert np.array_equal(np.asarray(rgb), want)


def test_broken_exif_keeps_the_picture_and_no_warning_escapes():
    photo = encode(Image.new("RGB", (48, 40), (5, 6, 7)), "JPEG")
    junk = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(range(40))
    data = photo[:2] + b"\xff\xe1" + (len(junk) + 2).to_bytes(2, "big") + junk + photo[2:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = inspect_image(data, DecodeLimits())
        rgb = load_rgb(data, DecodeLimits())
    assert caught == []
    assert isinstance(info, ImageInfo) and info.orientation == 1 and rgb.size == (48, 40)


# ---------------------------------------------------------------- bombs and global Pillow state


def test_pillow_bomb_warning_and_error_become_rejections(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above 1000 and raises above 2000
    warn_band = encode(Image.new("L", (40, 40)), "PNG")  # 1600 pixels
    error_band = encode(Image.new("L", (50, 50)), "PNG")  # 2500 pixels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [inspect_image(d, DecodeLimits()) for d in (warn_band, error_band)]
    assert caught == []
    assert [r.reason for r in results] == ["too_many_pixels", "too_many_pixels"]
    assert "MAX_IMAGE_PIXELS" in results[0].detail and "Pillow refused it" in results[1].detail


def test_header_bomb_never_reaches_the_decoder(monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    big = encode(Image.new("1", (4000, 3000)), "PNG")  # 1.2e7 pixels in ~2 KB
    result = inspect_image(big, DecodeLimits(max_pixels=10_000_000))
    assert isinstance(result, Rejected) and result.reason == "too_many_pixels" and loads == []
    assert isinstance(inspect_image(big, DecodeLimits(max_pixels=12_000_000)), ImageInfo)
    assert set(loads) == {(4000, 3000)}  # the spy does see real decodes


def test_load_truncated_images_must_stay_off(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        inspect_image(astronaut_jpeg(), DecodeLimits())


# ---------------------------------------------------------------- fuzz


def _seeds() -> list[bytes]:
    xs, ys = np.meshgrid(np.arange(48) * 5, np.arange(40) * 6)
    grad = np.dstack([xs, ys, np.full((40, 48), 90)]).astype(np.uint8)
    im = Image.fromarray(grad)
    return [
        encode(im, "JPEG", quality=80),
        encode(im, "PNG"),
        encode(im.convert("P"), "GIF"),
        encode(im, "WEBP", quality=80),
        encode(im, "BMP"),
        encode(im, "TIFF", compression="tiff_lzw"),
        encode(im.convert("LA"), "PNG"),
    ]


def test_mutated_files_only_ever_give_a_known_reason_or_valid_rgb():
    rng = np.random.default_rng(1234)
    seen: set[str] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in _seeds():
            for _ in range(40):
                buf = bytearray(seed)
                for pos in rng.integers(0, len(buf), int(rng.integers(1, 6))):
                    buf[pos] = int(rng.integers(0, 256))
                if rng.random() < 0.3:
                    buf = buf[: int(rng.integers(1, len(buf)))]
                data = bytes(buf)
                result = inspect_image(data, DecodeLimits())
                try:
                    rgb = load_rgb(data, DecodeLimits())
                except DecodeError as exc:
                    assert exc.reason in REASONS
                    seen.add(exc.reason)
                    continue
                assert isinstance(result, ImageInfo), result
                assert rgb.mode == "RGB" and rgb.size == (result.width, result.height)
                seen.add("ok")
    assert caught == []
    assert {"ok", "truncated", "corrupt"} <= seen
