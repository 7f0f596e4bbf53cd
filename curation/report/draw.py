"""Charts and image montages drawn with Pillow only (no plotting library, nothing fetched at view time)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ["bar_chart", "caption_tile", "font", "grid_rows", "histogram", "pair_tile", "thumbnail"]

BG = (255, 255, 255)
FG = (40, 40, 40)
BAR = (66, 110, 180)
GRID = (225, 225, 225)
MARK = (200, 40, 40)


def font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font (scalable on Pillow >= 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, f) -> int:
    box = draw.textbbox((0, 0), text, font=f)
    return box[2] - box[0]


def bar_chart(values: Sequence[float], labels: Sequence[str] | None = None, *, title: str = "",
              width: int = 720, height: int = 300, color: tuple[int, int, int] = BAR,
              annotate: bool = True) -> Image.Image:  # fmt: skip
    """A vertical bar chart with a title, a y axis from 0 to the maximum, and optional x labels/annotations.

    With many bars (over ~40) labels and annotations are left out and the bars become a histogram-like profile.
    """
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    f, fs = font(13), font(10)
    left, right, top, bottom = 60, 12, 40 if title else 16, 96 if labels and len(values) <= 40 else 24
    if title:
        d.text((left, 6), title, fill=FG, font=f)
    vmax = max([float(v) for v in values] + [1e-12])
    plot_h = height - top - bottom
    plot_w = width - left - right
    for k in range(5):  # horizontal grid lines with tick values
        y = top + plot_h - plot_h * k / 4
        d.line([(left, y), (width - right, y)], fill=GRID)
        tick = vmax * k / 4
        d.text((4, y - 6), f"{tick:.0f}" if vmax >= 10 else f"{tick:.2f}", fill=FG, font=fs)
    n = max(1, len(values))
    slot = plot_w / n
    bw = max(1.0, slot * 0.8)
    for i, v in enumerate(values):
        x0 = left + i * slot + (slot - bw) / 2
        h = plot_h * float(v) / vmax
        d.rectangle([x0, top + plot_h - h, x0 + bw - 1, top + plot_h], fill=color)
        if annotate and len(values) <= 40:
            t = f"{v:g}" if isinstance(v, float) else str(v)
            d.text((x0 + bw / 2 - _text_w(d, t, fs) / 2, top + plot_h - h - 12), t, fill=FG, font=fs)
        if labels and len(values) <= 40:
            lab = str(labels[i])[:24]
            tw = _text_w(d, lab, fs)
            lbl = Image.new("RGBA", (tw + 2, 14), (255, 255, 255, 0))
            ImageDraw.Draw(lbl).text((0, 0), lab, fill=FG, font=fs)
            lbl = lbl.rotate(35, expand=True)
            img.paste(lbl, (int(x0 + bw / 2 - lbl.width + 6), top + plot_h + 4), lbl)
    d.line([(left, top + plot_h), (width - right, top + plot_h)], fill=FG)
    return img


def thumbnail(img: Image.Image | None, size: int, border: tuple[int, int, int] | None = None) -> Image.Image:
    """``img`` fitted (letterboxed) into a ``size`` square; a grey cross when the image is missing."""
    tile = Image.new("RGB", (size, size), (245, 245, 245))
    if img is None:
        d = ImageDraw.Draw(tile)
        d.line([(0, 0), (size, size)], fill=(180, 180, 180), width=2)
        d.line([(0, size), (size, 0)], fill=(180, 180, 180), width=2)
    else:
        im = ImageOps.contain(img.convert("RGB"), (size, size), Image.BICUBIC)
        tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    if border is not None:
        ImageDraw.Draw(tile).rectangle([0, 0, size - 1, size - 1], outline=border, width=3)
    return tile


def caption_tile(tile: Image.Image, text: str) -> Image.Image:
    """``tile`` with one line of small text below it."""
    out = Image.new("RGB", (tile.width, tile.height + 14), BG)
    out.paste(tile, (0, 0))
    d = ImageDraw.Draw(out)
    f = font(10)
    while text and _text_w(d, text, f) > tile.width:
        text = text[:-1]
    d.text((1, tile.height + 1), text, fill=FG, font=f)
    return out


def grid_rows(rows: Sequence[tuple[str, Sequence[Image.Image]]], *, pad: int = 4, label_w: int = 150) -> Image.Image:
    """Rows of equally sized tiles, each row headed by a label on the left."""
    if not rows:
        img = Image.new("RGB", (400, 40), BG)
        ImageDraw.Draw(img).text((8, 12), "(nothing to show)", fill=FG, font=font(13))
        return img
    tw = max((t.width for _, tiles in rows for t in tiles), default=64)
    th = max((t.height for _, tiles in rows for t in tiles), default=64)
    ncol = max((len(tiles) for _, tiles in rows), default=1)
    img = Image.new("RGB", (label_w + ncol * (tw + pad) + pad, len(rows) * (th + pad) + pad), BG)
    d = ImageDraw.Draw(img)
    f = font(12)
    for r, (label, tiles) in enumerate(rows):
        y = pad + r * (th + pad)
        for k, line in enumerate(label.split("\n")):
            d.text((6, y + 4 + 15 * k), line, fill=FG, font=f)
        for c, t in enumerate(tiles):
            img.paste(t, (label_w + c * (tw + pad), y))
    return img


def histogram(series: Sequence[tuple[str, Sequence[int], tuple[int, int, int]]], edges: Sequence[float], *,
              marks: Sequence[tuple[str, float]] = (), title: str = "", width: int = 720,
              height: int = 300) -> Image.Image:  # fmt: skip
    """Counts per bin (``len(edges) - 1`` bins) of one or more ``(label, counts, colour)`` series, stacked, on an
    x axis of scores; every ``(label, x)`` of ``marks`` is a vertical red line with its label (a threshold)."""
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    f, fs = font(13), font(10)
    left, right, top, bottom = 60, 12, 52 if title else 28, 30
    if title:
        d.text((left, 6), title, fill=FG, font=f)
    n = len(edges) - 1
    totals = [sum(int(s[1][i]) for s in series) for i in range(n)]
    step_y = _nice_step(max(totals + [1]) / 4)
    vmax = 4 * step_y
    plot_h, plot_w = height - top - bottom, width - left - right
    lo, hi = float(edges[0]), float(edges[-1])

    def x_of(v: float) -> float:
        return left + plot_w * (min(max(v, lo), hi) - lo) / max(hi - lo, 1e-12)

    for k in range(5):
        y = top + plot_h - plot_h * k / 4
        d.line([(left, y), (width - right, y)], fill=GRID)
        d.text((4, y - 6), str(step_y * k), fill=FG, font=fs)
    for i in range(n):
        base = 0
        for _, counts, color in series:
            c = int(counts[i])
            if c:
                y0, y1 = top + plot_h - plot_h * (base + c) / vmax, top + plot_h - plot_h * base / vmax
                d.rectangle([x_of(edges[i]) + 1, y0, max(x_of(edges[i]) + 1, x_of(edges[i + 1]) - 1), y1], fill=color)
            base += c
    d.line([(left, top + plot_h), (width - right, top + plot_h)], fill=FG)
    step = 0.1 if hi - lo <= 1.01 else 0.2
    t = lo
    while t <= hi + 1e-9:
        d.line([(x_of(t), top + plot_h), (x_of(t), top + plot_h + 4)], fill=FG)
        d.text((x_of(t) - 8, top + plot_h + 6), f"{t:.1f}", fill=FG, font=fs)
        t += step
    for j, (label, v) in enumerate(marks):
        x = x_of(v)
        for y in range(top - 4, top + plot_h, 6):  # dashed
            d.line([(x, y), (x, min(y + 3, top + plot_h))], fill=MARK, width=2)
        d.text((min(x + 3, width - right - _text_w(d, label, fs)), top - 16 + 12 * (j % 2) - 12), label,
               fill=MARK, font=fs)  # fmt: skip
    x = width - right
    for label, _, color in reversed(series):  # legend, right-aligned on the title line
        x -= _text_w(d, label, fs) + 18
        d.rectangle([x, 8, x + 10, 18], fill=color)
        d.text((x + 13, 7), label, fill=FG, font=fs)
    return img


def _nice_step(raw: float) -> int:
    """The smallest of 1, 2, 3, 5, 10, 20, 30, 50, ... at least ``raw`` (whole-number axis ticks)."""
    base = 1
    while True:
        for m in (1, 2, 3, 5):
            if base * m >= raw:
                return base * m
        base *= 10


def pair_tile(a: Image.Image | None, b: Image.Image | None, size: int, caption: str,
              borders: tuple[tuple[int, int, int] | None, tuple[int, int, int] | None] = (None, None)
              ) -> Image.Image:  # fmt: skip
    """Two thumbnails side by side (``size`` each, a 2-pixel gap) with one caption line below them."""
    out = Image.new("RGB", (2 * size + 2, size), BG)
    out.paste(thumbnail(a, size, borders[0]), (0, 0))
    out.paste(thumbnail(b, size, borders[1]), (size + 2, 0))
    return caption_tile(out, caption)
