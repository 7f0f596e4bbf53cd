"""Copy edits people apply to web images, for the copy-detection benchmark (:mod:`curation.verify.bench_data`).

One function per edit family, ``edit(img, rng) -> img``, after the augmentations of the copy-detection literature
(DISC21 / SSCD): re-encoding, rescaling, crops (down to a fifth of the area), flips, colour changes, grayscale,
rotations, blur, noise, text and emoji overlays, borders and screenshot frames, aspect changes, perspective, and
combinations of these. Every edit is deterministic given ``rng`` (a ``random.Random``).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

__all__ = ["EDITS", "FAMILIES", "encode"]

_WORDS = ("lol", "SALE -50%", "when the code compiles", "#nofilter", "me irl", "Photo: J. Doe", "© stock",
          "Monday mood", "wait for it", "BREAKING", "share if you agree", "2024")  # fmt: skip


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """Encode ``img`` as JPEG (at ``quality``) or PNG bytes."""
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def _scale(img: Image.Image, s: float) -> Image.Image:
    return img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.BICUBIC)


def jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    """Re-encode at JPEG quality 8-30 (blocking, ringing, colour bleeding)."""
    return Image.open(io.BytesIO(encode(img, quality=rng.randint(8, 30)))).convert("RGB")


def rescale(img: Image.Image, rng: random.Random) -> Image.Image:
    """Downscale to 30-60% of the side (thumbnails)."""
    return _scale(img, rng.uniform(0.3, 0.6))


def _crop_area(img: Image.Image, rng: random.Random, lo: float, hi: float) -> Image.Image:
    area = rng.uniform(lo, hi)
    aspect = rng.uniform(0.7, 1.4)
    w = min(1.0, (area * aspect) ** 0.5)
    h = min(1.0, area / w)
    x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    box = (round(x * img.width), round(y * img.height), round((x + w) * img.width), round((y + h) * img.height))
    return img.crop(box)


def crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """Keep 50-80% of the area anywhere in the picture."""
    return _crop_area(img, rng, 0.5, 0.8)


def heavy_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """Keep 20-40% of the area, at its native resolution or upscaled back to the original size."""
    out = _crop_area(img, rng, 0.2, 0.4)
    if rng.random() < 0.5:
        out = _scale(out, min(img.width / out.width, img.height / out.height))
    return out


def flip(img: Image.Image, rng: random.Random) -> Image.Image:
    """Horizontal mirror (plus a mild rescale)."""
    return _scale(ImageOps.mirror(img), rng.uniform(0.7, 1.0))


def color(img: Image.Image, rng: random.Random) -> Image.Image:
    """Hue rotation, saturation, brightness, contrast and gamma changes."""
    hsv = np.asarray(img.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + rng.randrange(30, 226)) % 256
    out = Image.fromarray(hsv, "HSV").convert("RGB")
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.3, 2.0))
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.6, 1.4))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.6, 1.5))
    gamma = rng.uniform(0.6, 1.6)
    return out.point([round(255 * (i / 255) ** gamma) for i in range(256)] * 3)


def gray(img: Image.Image, rng: random.Random) -> Image.Image:
    """Grayscale, sometimes with a contrast change."""
    out = ImageOps.grayscale(img)
    if rng.random() < 0.5:
        out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.4))
    return out.convert("RGB")


def rotate(img: Image.Image, rng: random.Random) -> Image.Image:
    """Rotate by 4-25 degrees either way; keep the corners (filled) or crop to the rotated frame's inside."""
    angle = rng.uniform(4, 25) * rng.choice((-1, 1))
    if rng.random() < 0.5:
        return img.rotate(angle, Image.BICUBIC, expand=True, fillcolor=_colour(rng))
    out = img.rotate(angle, Image.BICUBIC, expand=False)
    t = abs(np.sin(np.radians(angle)))
    m = round(t * min(img.size) * 0.9)
    return out.crop((m, m, img.width - m, img.height - m))


def blur(img: Image.Image, rng: random.Random) -> Image.Image:
    """Gaussian blur of radius 1.5-4 px (at up to 768 px), or a box blur."""
    if rng.random() < 0.7:
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 4.0)))
    return img.filter(ImageFilter.BoxBlur(rng.randint(2, 4)))


def noise(img: Image.Image, rng: random.Random) -> Image.Image:
    """Additive Gaussian noise (sigma 8-30) or salt-and-pepper noise (2-6% of the pixels)."""
    gen = np.random.default_rng(rng.randrange(2**32))
    a = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.7:
        a = a + gen.normal(0, rng.uniform(8, 30), a.shape)
    else:
        mask = gen.random(a.shape[:2])
        p = rng.uniform(0.02, 0.06)
        a = a.copy()
        a[mask < p / 2] = 0
        a[mask > 1 - p / 2] = 255
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def text(img: Image.Image, rng: random.Random) -> Image.Image:
    """Captions: meme-style bars above/below, or large words written over the picture."""
    out = img.copy()
    size = max(12, round(min(img.size) * rng.uniform(0.07, 0.14)))
    font = _font(size)
    if rng.random() < 0.5:
        bar = round(size * 1.6)
        canvas = Image.new("RGB", (img.width, img.height + 2 * bar), (255, 255, 255) if rng.random() < 0.5 else 0)
        canvas.paste(out, (0, bar))
        d = ImageDraw.Draw(canvas)
        fill = (0, 0, 0) if canvas.getpixel((0, 0)) == (255, 255, 255) else (255, 255, 255)
        d.text((size // 2, size // 4), rng.choice(_WORDS), font=font, fill=fill)
        d.text((size // 2, img.height + bar + size // 4), rng.choice(_WORDS), font=font, fill=fill)
        return canvas
    d = ImageDraw.Draw(out)
    for _ in range(rng.randint(1, 3)):
        xy = (rng.uniform(0, 0.5) * img.width, rng.uniform(0, 0.85) * img.height)
        d.text(xy, rng.choice(_WORDS), font=font, fill=_colour(rng), stroke_width=max(1, size // 12),
               stroke_fill=(0, 0, 0))  # fmt: skip
    return out


def emoji(img: Image.Image, rng: random.Random) -> Image.Image:
    """Two to five emoji-like stickers (faces, hearts, stars), each 8-22% of the short side."""
    out = img.copy()
    d = ImageDraw.Draw(out)
    for _ in range(rng.randint(2, 5)):
        r = round(min(img.size) * rng.uniform(0.04, 0.11))
        cx, cy = rng.uniform(r, img.width - r), rng.uniform(r, img.height - r)
        kind = rng.choice(("face", "heart", "star"))
        if kind == "face":
            box = (cx - r, cy - r, cx + r, cy + r)
            d.ellipse(box, fill=(255, 204, 51), outline=(120, 80, 0), width=max(1, r // 10))
            for ex in (-0.35, 0.35):
                d.ellipse((cx + ex * r - r * 0.12, cy - r * 0.35, cx + ex * r + r * 0.12, cy - r * 0.05), fill=0)
            d.arc((cx - r * 0.55, cy - r * 0.4, cx + r * 0.55, cy + r * 0.6), 20, 160, fill=0, width=max(1, r // 8))
        elif kind == "heart":
            d.ellipse((cx - r, cy - r * 0.6, cx, cy + r * 0.3), fill=(220, 20, 60))
            d.ellipse((cx, cy - r * 0.6, cx + r, cy + r * 0.3), fill=(220, 20, 60))
            d.polygon([(cx - r * 0.97, cy), (cx + r * 0.97, cy), (cx, cy + r)], fill=(220, 20, 60))
        else:
            pts = [(cx + r * (1 if k % 2 == 0 else 0.45) * np.sin(k * np.pi / 5),
                    cy - r * (1 if k % 2 == 0 else 0.45) * np.cos(k * np.pi / 5)) for k in range(10)]  # fmt: skip
            d.polygon(pts, fill=_colour(rng), outline=0)
    return out


def border(img: Image.Image, rng: random.Random) -> Image.Image:
    """Padding: a solid frame, a blurred copy of the picture as background, or a screenshot (window bars, text)."""
    w, h = img.size
    kind = rng.choice(("solid", "blurred", "screenshot"))
    if kind == "solid":
        p = [round(rng.uniform(0.03, 0.25) * s) for s in (w, h, w, h)]
        return ImageOps.expand(img, border=tuple(p), fill=_colour(rng))
    if kind == "blurred":
        cw, ch = round(w * rng.uniform(1.2, 1.6)), round(h * rng.uniform(1.0, 1.3))
        canvas = img.resize((cw, ch)).filter(ImageFilter.GaussianBlur(20))
        canvas.paste(img, ((cw - w) // 2, (ch - h) // 2))
        return canvas
    top, side, bottom = round(h * rng.uniform(0.08, 0.15)), round(w * rng.uniform(0.02, 0.1)), round(h * 0.06)
    canvas = Image.new("RGB", (w + 2 * side, h + top + bottom), (236, 236, 236) if rng.random() < 0.5 else (40, 40, 44))
    canvas.paste(img, (side, top))
    d = ImageDraw.Draw(canvas)
    ink = (90, 90, 90)
    for i, c in enumerate(((255, 95, 86), (255, 189, 46), (39, 201, 63))):
        d.ellipse((10 + i * 22, 8, 24 + i * 22, 22), fill=c)
    d.text((90, 6), "image.jpg - Viewer", font=_font(max(10, top // 3)), fill=ink)
    d.rectangle((side, top - top // 3, w // 2, top - 4), outline=ink)
    d.text((side + 4, h + top + 2), f"{w} x {h}  100%", font=_font(max(9, bottom // 2)), fill=ink)
    return canvas


def aspect(img: Image.Image, rng: random.Random) -> Image.Image:
    """Stretch one axis by 0.6-0.8 or 1.25-1.6 (non-uniform rescale)."""
    s = rng.choice((rng.uniform(0.6, 0.8), rng.uniform(1.25, 1.6)))
    return img.resize((max(8, round(img.width * s)), img.height), Image.BICUBIC)


def perspective(img: Image.Image, rng: random.Random) -> Image.Image:
    """Projective warp: each corner moved inwards by up to 18% of the side (a photo of a screen or print)."""
    w, h = img.size
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    j = [(rng.uniform(0, 0.18) * w, rng.uniform(0, 0.18) * h) for _ in range(4)]
    dst = np.float32([[j[0][0], j[0][1]], [w - j[1][0], j[1][1]], [w - j[2][0], h - j[2][1]], [j[3][0], h - j[3][1]]])
    m = cv2.getPerspectiveTransform(src, dst)
    fill = _colour(rng)
    out = cv2.warpPerspective(np.asarray(img), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=fill)
    return Image.fromarray(out)


_MILD: tuple[Callable[[Image.Image, random.Random], Image.Image], ...] = (
    rescale, crop, flip, color, gray, rotate, blur, noise, text, emoji, border, aspect)


def combo(img: Image.Image, rng: random.Random) -> Image.Image:
    """Two to four of the other edits in a row, then a JPEG re-encode at quality 20-60."""
    for fn in rng.sample(_MILD, rng.randint(2, 4)):
        img = fn(img, rng)
    return Image.open(io.BytesIO(encode(img, quality=rng.randint(20, 60)))).convert("RGB")


#: Edit family name -> edit function, in a fixed order.
EDITS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "jpeg": jpeg, "rescale": rescale, "crop": crop, "heavy_crop": heavy_crop, "flip": flip, "color": color,
    "gray": gray, "rotate": rotate, "blur": blur, "noise": noise, "text": text, "emoji": emoji, "border": border,
    "aspect": aspect, "perspective": perspective, "combo": combo,
}  # fmt: skip
FAMILIES: tuple[str, ...] = tuple(EDITS)
