"""Multi-crop augmentation: shapes, determinism, op probabilities (paper and official inversion), crop scales,
value ranges, exact colour/blur maths and JPEG draft decoding."""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugment,
    MultiCropConfig,
    _Workspace,
    decode_for_crops,
    sample_crop_box,
)

LADYBIRD = "/usr/share/backgrounds/mate/nature/LadyBird.jpg"
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def tiny(**kw) -> MultiCropConfig:
    return MultiCropConfig(global_size=56, local_size=28, n_local=kw.pop("n_local", 3), **kw)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((160, 120), Image.Resampling.BICUBIC)


def to_pixels(t: torch.Tensor) -> torch.Tensor:
    return t * STD * 255 + MEAN * 255


def test_shapes_dtypes(photo):
    out = MultiCropAugment(tiny())(photo, np.random.default_rng(0))
    assert len(out["global"]) == 2 and len(out["local"]) == 3
    for t in out["global"]:
        assert t.shape == (3, 56, 56) and t.dtype == torch.float32 and torch.isfinite(t).all()
    for t in out["local"]:
        assert t.shape == (3, 28, 28) and t.dtype == torch.float32 and torch.isfinite(t).all()
    gray = photo.convert("L")  # non-RGB input is converted
    assert MultiCropAugment(tiny(n_local=0))(gray, np.random.default_rng(0))["local"] == []


def test_deterministic_under_seed(photo):
    aug = MultiCropAugment(tiny())
    a = aug(photo, np.random.default_rng([7, 1, 42]), return_ops=True)
    b = MultiCropAugment(tiny())(photo, np.random.default_rng([7, 1, 42]), return_ops=True)
    c = aug(photo, np.random.default_rng([7, 1, 43]), return_ops=True)
    assert a["ops"] == b["ops"]
    for x, y in zip(a["global"] + a["local"], b["global"] + b["local"]):
        assert torch.equal(x, y)
    assert a["ops"] != c["ops"]
    assert not torch.equal(a["global"][0], c["global"][0])


def rates(cfg: MultiCropConfig, draws: int = 400) -> dict[str, dict[str, float]]:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    aug = MultiCropAugment(cfg)
    ops = [op for i in range(draws) for op in aug(img, np.random.default_rng(i), return_ops=True)["ops"]]
    out = {}
    for kind in ("global1", "global2", "local"):
        sel = [o for o in ops if o.kind == kind]
        out[kind] = {
            "flip": np.mean([o.flip for o in sel]),
            "jitter": np.mean([bool(o.jitter) for o in sel]),
            "gray": np.mean([o.grayscale for o in sel]),
            "blur": np.mean([o.blur_sigma is not None for o in sel]),
            "solarize": np.mean([o.solarize for o in sel]),
        }
    return out


def test_probabilities_paper():
    r = rates(MultiCropConfig(global_size=16, local_size=8, n_local=2))
    for kind in r:
        assert abs(r[kind]["flip"] - 0.5) < 0.08, r
        assert abs(r[kind]["jitter"] - 0.8) < 0.07, r
        assert abs(r[kind]["gray"] - 0.2) < 0.07, r
    assert r["global1"]["blur"] == 1.0
    assert abs(r["global2"]["blur"] - 0.1) < 0.05
    assert abs(r["local"]["blur"] - 0.5) < 0.06
    assert abs(r["global2"]["solarize"] - 0.2) < 0.06
    assert r["global1"]["solarize"] == 0.0 and r["local"]["solarize"] == 0.0


def test_probabilities_official_inversion():
    cfg = MultiCropConfig(global_size=16, local_size=8, n_local=2, official_blur_inversion=True)
    assert cfg.blur_probabilities == pytest.approx((0.0, 0.9, 0.5))
    r = rates(cfg)
    assert r["global1"]["blur"] == 0.0
    assert abs(r["global2"]["blur"] - 0.9) < 0.05
    assert abs(r["local"]["blur"] - 0.5) < 0.06
    assert abs(r["global2"]["solarize"] - 0.2) < 0.06


def test_jitter_factors_and_sigma_ranges(photo):
    aug = MultiCropAugment(tiny(jitter_p=1.0))
    names = set()
    for i in range(50):
        for op in aug(photo, np.random.default_rng(i), return_ops=True)["ops"]:
            assert sorted(n for n, _ in op.jitter) == ["brightness", "contrast", "hue", "saturation"]
            names.add(tuple(n for n, _ in op.jitter))
            f = dict(op.jitter)
            assert 0.6 <= f["brightness"] <= 1.4 and 0.6 <= f["contrast"] <= 1.4
            assert 0.8 <= f["saturation"] <= 1.2 and -0.1 <= f["hue"] <= 0.1
            if op.blur_sigma is not None:
                assert 0.1 <= op.blur_sigma <= 2.0
    assert len(names) > 10  # the op order is random


def test_crop_scale_and_ratio_ranges():
    rng = np.random.default_rng(0)
    for scale in ((0.32, 1.0), (0.05, 0.32)):
        areas = []
        for _ in range(500):
            left, top, w, h = sample_crop_box(rng, 240, 240, scale, (3 / 4, 4 / 3))
            assert left >= 0 and left + w <= 240 and top >= 0 and top + h <= 240
            areas.append(w * h / 240**2)
            assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        assert scale[0] - 0.01 <= min(areas) and max(areas) <= scale[1] + 0.01
        spread = scale[1] - scale[0]  # the whole range is used
        assert min(areas) < scale[0] + 0.1 * spread and max(areas) > scale[1] - 0.2 * spread
    # impossible requests fall back to a centre crop clamped to the ratio range
    assert sample_crop_box(rng, 1000, 10, (0.9, 1.0), (3 / 4, 4 / 3)) == (493, 0, 13, 10)


def test_identity_pipeline_normalises_exactly():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    cfg = MultiCropConfig(global_size=40, local_size=20, n_local=1, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0,
                          blur_p_local=0.0, solarize_p=0.0)
    out = MultiCropAugment(cfg)(img, rng)
    expected = (torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255 - MEAN) / STD
    assert torch.allclose(out["global"][0], expected, atol=1e-5)
    flipped = MultiCropAugment(MultiCropConfig(**{**cfg.__dict__, "flip_p": 1.0}))(img, rng)["global"][1]
    assert torch.allclose(flipped, expected.flip(-1), atol=1e-5)


def test_values_stay_in_range(photo):
    aug = MultiCropAugment(tiny(jitter_p=1.0, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5))
    for i in range(30):
        out = aug(photo, np.random.default_rng(i))
        for t in out["global"] + out["local"]:
            px = to_pixels(t)
            assert px.min() >= -1e-3 and px.max() <= 255 + 1e-3


def test_colour_ops_match_reference_maths():
    rng = np.random.default_rng(1)
    ws = _Workspace(9, 1)
    src = rng.uniform(0, 255, (3, 9, 9)).astype(np.float32)
    src[:, 0, :3] = 77.0  # grey pixels (zero chroma) keep their value under a hue shift
    src[:, 1, 0] = (200.0, 200.0, 10.0)  # ties between the max channels
    ws.x[:] = src
    gray = 0.2989 * src[0] + 0.587 * src[1] + 0.114 * src[2]
    for shift in (0.0, 0.07, -0.1, 0.5):
        ws.x[:] = src
        ws.hue(shift)
        ref = np.empty_like(src)
        for i in range(9):
            for j in range(9):
                h, s, v = colorsys.rgb_to_hsv(*(src[:, i, j] / 255))
                ref[:, i, j] = np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255
        assert np.abs(ws.x - ref).max() < 2e-3, shift
    ws.x[:] = src
    ws.saturation(1.2)
    assert np.allclose(ws.x, np.clip(1.2 * src - 0.2 * gray, 0, 255), atol=1e-3)
    ws.x[:] = src
    ws.contrast(0.7)
    assert np.allclose(ws.x, np.clip(0.7 * src + 0.3 * gray.mean(), 0, 255), atol=1e-3)
    ws.x[:] = src
    ws.brightness(1.3)
    assert np.allclose(ws.x, np.clip(1.3 * src, 0, 255), atol=1e-3)
    ws.x[:] = src
    ws.grayscale()
    assert np.allclose(ws.x, np.broadcast_to(gray, src.shape), atol=1e-3)
    ws.x[:] = src
    ws.solarize(128)
    assert np.allclose(ws.x, np.where(src >= 128, 255 - src, src))


@pytest.mark.parametrize("size", [9, 5, 24])
def test_blur_is_reflect_padded_gaussian(size):
    rng = np.random.default_rng(2)
    ws = _Workspace(size, 3)
    src = rng.uniform(0, 255, (3, size, size)).astype(np.float32)
    ws.stage_np[:] = src[None] + np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    ws.blur([2, 0, 1], [1.0, 0.1, 2.0])  # batched, one sigma per view, any order
    for i, sigma in enumerate((0.1, 2.0, 1.0)):
        r = min(4, size - 1)
        k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        k /= k.sum()
        p = np.pad(src.astype(np.float64) + i, ((0, 0), (r, r), (r, r)), mode="reflect")
        ref = sum(k[t] * p[:, t : t + size, :] for t in range(2 * r + 1))
        ref = sum(k[t] * ref[:, :, t : t + size] for t in range(2 * r + 1))
        assert np.abs(ws.stage_np[i] - ref).max() < 1e-2, (size, sigma)
    assert np.abs(ws.stage_np[0] - src).max() < 1e-2  # sigma 0.1 is (numerically) the identity


def test_draft_decode_keeps_needed_size():
    with open(LADYBIRD, "rb") as f:
        data = f.read()
    full = decode_for_crops(data, 0)
    assert full.size == (2560, 1600) and full.mode == "RGB"
    need = MultiCropConfig().min_decode_side
    assert need == 439
    img = decode_for_crops(data, need)
    assert min(img.size) >= need and img.size == (1280, 800) and img.mode == "RGB"
    small = decode_for_crops(data, 300)
    assert small.size == (640, 400)  # 1/4 scale: still >= 300 on both sides
    # no draft below 2x the need, non-JPEG formats and grayscale JPEGs decode fully to RGB
    buf = io.BytesIO()
    Image.new("L", (500, 375), 90).save(buf, "JPEG", quality=90)
    assert decode_for_crops(buf.getvalue(), need).size == (500, 375)
    assert decode_for_crops(buf.getvalue(), need).mode == "RGB"
    buf = io.BytesIO()
    Image.new("RGBA", (900, 900), (1, 2, 3, 4)).save(buf, "PNG")
    png = decode_for_crops(buf.getvalue(), 100)
    assert png.size == (900, 900) and png.mode == "RGB"
    with pytest.raises(OSError):
        decode_for_crops(data[: len(data) // 3], need)  # truncated
    with pytest.raises(OSError):
        decode_for_crops(b"not an image", need)


@pytest.mark.parametrize(("kw", "field"), [
    ({"global_size": 0}, "global_size"),
    ({"n_local": -1}, "n_local"),
    ({"global_scale": (0.5, 0.2)}, "global_scale"),
    ({"flip_p": 1.5}, "flip_p"),
    ({"blur_p_local": -0.1}, "blur_p_local"),
    ({"hue": 0.7}, "hue"),
    ({"blur_sigma": (2.0, 0.1)}, "blur_sigma"),
    ({"decode_min_size": -1}, "decode_min_size"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MultiCropConfig(**kw)


def test_config_builds_from_recipe_values():
    from pretrain.utils.config import build, dump_toml, to_dict

    cfg = build(MultiCropConfig, {"global_scale": [0.4, 1.0], "n_local": 6, "official_blur_inversion": True})
    assert cfg.global_scale == (0.4, 1.0) and cfg.n_local == 6 and cfg.blur_probabilities[0] == 0.0
    assert "global_scale = [0.4, 1.0]" in dump_toml(to_dict(cfg))
    with pytest.raises(ValueError, match="local_scale"):
        build(MultiCropConfig, {"local_scale": [0.5, 0.1]})
