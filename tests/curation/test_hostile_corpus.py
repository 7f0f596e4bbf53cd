"""Hostile corpus: every broken or hostile file ends exactly as expected, conversions are right, bombs stay cheap."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from curation.decode import DecodeError, DecodeLimits, ImageInfo, Rejected, decode_rgb, inspect_image, load_rgb
from curation.io.tar_stream import iter_tar_members, read_member
from tests.curation.hostile import PIXELS, corpus_uris, make_hostile_corpus, no_writes

REPO = Path(__file__).resolve().parents[2]
BOMBS = ("bomb.png", "bomb_warn_palette.png", "huge_gif.gif")
REQUIRED = {
    "truncated.jpg",
    "zero.jpg",
    "text.jpg",
    "bomb.png",
    "badcrc_ihdr.png",
    "badcrc_idat.png",
    "gray16.png",
    "cmyk.jpg",
    "animated.gif",
    "tiny_1x1.png",
    "palette_trns.png",
    "la.png",
    "exif_rot6.jpg",
    "image.tiff",
    "image.webp",
    "page.png",
    "jpeg_garbage.jpg",
    "huge_gif.gif",
    "evil.tar::../evil.jpg",
    "evil.tar::/abs.jpg",
    "evil.tar::link.jpg",
    "evil.tar::good/000001.jpg",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    directory = tmp_path_factory.mktemp("hostile")
    return directory, make_hostile_corpus(directory)


def outcome(result: ImageInfo | Rejected) -> str:
    return f"reject:{result.reason}" if isinstance(result, Rejected) else f"ok:RGB {result.width}x{result.height}"


def files_of(expected: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in expected.items() if "::" not in k}


def test_corpus_covers_the_required_kinds(corpus):
    directory, expected = corpus
    assert set(expected) >= REQUIRED and len(expected) >= 14
    on_disk = {p.name for p in directory.iterdir()}
    assert on_disk == set(files_of(expected)) | {"evil.tar"}
    reasons = {v for v in expected.values() if v.startswith("reject:")}
    assert len(reasons) >= 9 and sum(v.startswith("ok:") for v in expected.values()) >= 10
    assert (directory / "bomb.png").stat().st_size < 200_000  # 9e8 pixels in ~110 KB
    uris = corpus_uris(directory, expected)
    assert uris[f"{directory}/evil.tar#../evil.jpg"] == "reject:unsafe_member_name"
    assert uris[f"{directory}/zero.jpg"] == "reject:empty" and len(uris) == len(expected)


def test_every_file_ends_exactly_as_expected(corpus):
    directory, expected = corpus
    got_inspect, got_load = {}, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in files_of(expected):
            data = (directory / name).read_bytes()
            got_inspect[name] = outcome(inspect_image(data, DecodeLimits()))
            try:
                rgb = load_rgb(data, DecodeLimits())
            except DecodeError as exc:
                got_load[name] = f"reject:{exc.reason}"
            else:
                assert rgb.mode == "RGB", name
                got_load[name] = f"ok:{rgb.mode} {rgb.width}x{rgb.height}"
    assert got_inspect == files_of(expected)
    assert got_load == files_of(expected)
    assert [str(w.message) for w in caught] == []


def test_conversions_give_the_right_pixels(corpus):
    directory, _ = corpus
    for name, checks in PIXELS.items():
        rgb = load_rgb((directory / name).read_bytes(), DecodeLimits())
        for xy, want, tol in checks:
            got = rgb.getpixel(xy)
            assert all(abs(a - b) <= tol for a, b in zip(got, want)), (name, xy, got, want)


def test_info_records_modes_frames_orientation_and_conversions(corpus):
    directory, _ = corpus

    def info(name: str) -> ImageInfo:
        result = inspect_image((directory / name).read_bytes(), DecodeLimits())
        assert isinstance(result, ImageInfo), (name, result)
        return result

    assert (info("cmyk.jpg").mode, info("cmyk.jpg").conversion) == ("CMYK", "CMYK->RGB")
    assert info("gray16.png").mode == "I;16" and info("gray16.png").converted
    assert info("animated.gif").n_frames == 3 and "first of 3 frames" in info("animated.gif").conversion
    assert info("image.tiff").n_frames == 2 and info("image.tiff").format == "tiff"
    assert info("exif_rot6.jpg").orientation == 6 and not info("exif_rot6.jpg").converted
    assert info("palette_trns.png").conversion == "P+transparency->RGB (alpha composited on white)"
    assert info("la.png").mode == "LA" and info("checker_1bit.bmp").mode == "1"
    assert info("png_named.jpg").format == "png" and info("image.webp").format == "webp"
    assert info("photo.jpg").conversion == "" and not info("photo.jpg").converted
    upright, rgb = decode_rgb((directory / "exif_rot6.jpg").read_bytes(), DecodeLimits(), draft_size=(24, 32))
    assert (upright.width, upright.height) == (48, 64) and rgb.size == (24, 32)  # DCT 1/2, still upright


def test_tar_members_end_as_expected_without_writing_anything(corpus, tmp_path, monkeypatch):
    directory, expected = corpus
    monkeypatch.chdir(tmp_path)
    tar = directory / "evil.tar"
    before = sorted(p.name for p in directory.parent.rglob("*"))
    got = {}
    with open(tar, "rb") as f, no_writes() as events:
        members = list(iter_tar_members(f, str(tar)))
    assert events == []
    for m in members:
        key = f"evil.tar::{m.name}"
        if m.rejected_reason:
            got[key] = f"reject:{m.rejected_reason}"
            continue
        got[key] = outcome(inspect_image(m.data, DecodeLimits()))
        assert read_member(str(tar), m.offset_data, m.size) == m.data
        assert load_rgb(read_member(str(tar), m.offset_data, m.size), DecodeLimits()).size == (64, 48)
    assert got == {k: v for k, v in expected.items() if k.startswith("evil.tar::")}
    assert sorted(p.name for p in directory.parent.rglob("*")) == before and list(tmp_path.iterdir()) == []


def test_bombs_never_reach_the_decoder(corpus, monkeypatch):
    directory, _ = corpus
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    for name in BOMBS:
        data = (directory / name).read_bytes()
        assert outcome(inspect_image(data, DecodeLimits())) == "reject:too_many_pixels", name
        with pytest.raises(DecodeError, match="too_many_pixels"):
            load_rgb(data, DecodeLimits(), draft_size=(224, 224))
    assert loads == []


_PROBE = """
import json, sys
from pathlib import Path
from curation.decode import DecodeError, DecodeLimits, inspect_image, load_rgb
from tests.curation.hostile import png_bytes

def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak()

def peak():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Vm"))
    return int(status["VmHWM"].split()[0]) * 1024

def run(data):
    out = [inspect_image(data, DecodeLimits()).__class__.__name__]
    try:
        out.append(load_rgb(data, DecodeLimits()).size)
    except DecodeError as exc:
        out.append(exc.reason)
    return out

bombs = [Path(p).read_bytes() for p in sys.argv[1:]]
control = png_bytes(4000, 3000, 1, 0)  # a legitimate 1.2e7-pixel image: proves the probe sees real decodes
base = reset_peak()
results = [run(d) for d in bombs]
bomb_growth = peak() - base
base = reset_peak()
control_result = run(control)
control_growth = peak() - base
print(json.dumps({"bomb_growth": bomb_growth, "control_growth": control_growth,
                  "results": results, "control": control_result}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak-RSS reset needs Linux /proc")
def test_bombs_cost_no_memory_while_a_real_decode_does(corpus):
    directory, _ = corpus
    paths = [str(directory / name) for name in BOMBS]
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *paths], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["results"] == [["Rejected", "too_many_pixels"]] * len(BOMBS)
    assert probe["control"] == ["ImageInfo", [4000, 3000]]
    mib = 1 << 20
    bomb_growth, control_growth = probe["bomb_growth"], probe["control_growth"]
    # decoding bomb.png would need >= 900 MB (one byte per pixel); the control's RGB result alone is 36 MB
    assert bomb_growth < 16 * mib, f"bombs raised peak RSS by {bomb_growth / mib:.1f} MiB"
    assert control_growth > 30 * mib, f"control raised peak RSS by only {control_growth / mib:.1f} MiB"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # the global ceiling was not tampered with here
