"""Copy-detection benchmark built from real photos shipped by packages (deterministic, seeded).

Sources: scikit-image's sample photos (``skimage.data``), scikit-learn's ``load_sample_images`` and Debian's
``mate-backgrounds`` (``/usr/share/backgrounds/mate/{nature,abstract,desktop}``); whatever is not installed is
left out. Groups of images that are copies of each other (the ground truth):

- every source photo is one group, except the large texture-like photos in :data:`TILED`, which are cut into
  2 x 2 non-overlapping tiles separated by a gap, each tile its own group: look-alike distractors (same camera,
  light and texture, no shared pixel), like the two tiles of one retina photo the descriptor scored 0.91;
- photos of similar texture or scene (brick / grass / gravel, the mate abstracts) are distinct groups too;
- each group holds its original (a JPEG of long side <= ``original_side``) and ``copies`` edited copies, one per
  edit family (:mod:`curation.verify.edits`), families dealt round-robin so each is used equally often.

Images are split by *source photo* (all tiles of a photo on one side) into a ``calibration`` and a ``held_out``
half. :func:`build` returns :class:`BenchImage` records holding the encoded bytes as a pool would store them.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from curation.verify.edits import EDITS, FAMILIES, encode

__all__ = ["HALVES", "LOW_TEXTURE", "TILED", "BenchImage", "build", "source_photos", "split_photos"]

log = logging.getLogger(__name__)

HALVES = ("calibration", "held_out")
MATE = Path("/usr/share/backgrounds/mate")
#: skimage photos (``cat`` is ``chelsea`` again and the motorcycle's right view another shot of the scene: left out).
SKIMAGE = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
           "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket", "stereo_motorcycle", "page",
           "text", "cell")  # fmt: skip
#: mate backgrounds: (folder/file, how to read it). ``alpha``: the picture is only in the alpha channel.
MATE_FILES = (
    *((f"nature/{n}.jpg", "rgb") for n in ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow",
                                          "LadyBird", "RainDrops", "Storm", "TwoWings", "Wood", "YellowFlower")),
    ("abstract/Elephants.jpg", "rgb"), ("desktop/Float-into-MATE.png", "rgb"), ("desktop/GreenTraditional.jpg", "rgb"),
    ("desktop/MATE-Stripes-Light.png", "alpha"), ("desktop/Stripes.png", "alpha"),
)  # fmt: skip
#: Low-texture graphics (smooth gradients, near-blank wallpapers): a handful of keypoints or none, so local
#: features cannot verify their copies; built only with ``build(low_texture=True)`` and reported on their own.
LOW_TEXTURE = (
    ("abstract/Flow.png", "rgb"), ("abstract/Gulp.png", "rgb"), ("abstract/Silk.png", "alpha"),
    ("abstract/Spring.png", "alpha"), ("abstract/Waves.png", "alpha"),
    ("abstract/Arc-Colors-Transparent-Wallpaper.png", "alpha"), ("desktop/Ubuntu-Mate-Cold-no-logo.png", "rgb"),
)  # fmt: skip
#: Photos cut into 2 x 2 non-overlapping tiles (each tile a group of its own).
TILED = ("retina", "hubble_deep_field", "Wood", "RainDrops", "Dune", "GreenMeadow", "Aqua", "Garden")


@dataclass(frozen=True)
class BenchImage:
    """One benchmark image and its labels."""

    key: str
    """Unique name: ``<group>/<family>``."""
    group: str
    """Ground-truth copy group: the source photo, or ``<photo>#<tile>`` for tiles."""
    photo: str
    """Source photo (the unit of the calibration / held-out split)."""
    family: str
    """``original`` or the edit family of :data:`curation.verify.edits.FAMILIES`."""
    half: str
    """``calibration`` or ``held_out``."""
    data: bytes
    """Encoded image (JPEG, or PNG for some screenshots and graphics)."""


def _thumb(img: Image.Image, side: int) -> Image.Image:
    img = img.copy()
    img.thumbnail((side, side), Image.LANCZOS)
    return img


@lru_cache(maxsize=4)
def source_photos(max_side: int = 1600, low_texture: bool = False) -> tuple[tuple[str, Image.Image], ...]:
    """Every available source photo as ``(name, RGB image with long side <= max_side)``, in a fixed order
    (``low_texture``: the :data:`LOW_TEXTURE` graphics instead)."""
    if low_texture:
        return tuple(_mate(LOW_TEXTURE, max_side))
    out: list[tuple[str, Image.Image]] = []
    try:
        import skimage.data

        for name in SKIMAGE:
            arr = getattr(skimage.data, name)()
            arr = arr[0] if isinstance(arr, tuple) else arr
            out.append((name, _thumb(Image.fromarray(np.asarray(arr)).convert("RGB"), max_side)))
    except ImportError:
        log.warning("scikit-image is not installed: its sample photos are left out of the benchmark")
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for path, arr in zip(bunch.filenames, bunch.images):
            out.append((Path(path).stem, _thumb(Image.fromarray(arr).convert("RGB"), max_side)))
    except ImportError:
        log.warning("scikit-learn is not installed: its sample photos are left out of the benchmark")
    out += _mate(MATE_FILES, max_side)
    return tuple(out)


def _mate(files: tuple[tuple[str, str], ...], max_side: int) -> list[tuple[str, Image.Image]]:
    out = []
    for rel, mode in files:
        path = MATE / rel
        if not path.exists():
            continue
        with Image.open(path) as im:
            im.draft("RGB", (max_side, max_side))
            pic = im.getchannel("A").convert("RGB") if mode == "alpha" else _over_white(im)
        out.append((path.stem, _thumb(pic, max_side)))
    return out


def _over_white(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def _tiles(img: Image.Image, gap: float = 0.08) -> list[Image.Image]:
    """2 x 2 tiles, ``gap`` of the side apart (and from nothing else: no pixel is shared)."""
    w, h = img.size
    tw, th = round(w * (1 - gap) / 2), round(h * (1 - gap) / 2)
    return [img.crop((x, y, x + tw, y + th)) for x in (0, w - tw) for y in (0, h - th)]


def split_photos(names: list[str], seed: int = 0) -> dict[str, str]:
    """Photo name -> half. Tiled and whole photos are split separately, each shuffled under ``seed`` and cut in
    two, so both halves get look-alike tiles."""
    rng = random.Random(seed)
    out: dict[str, str] = {}
    for subset in ([n for n in names if n in TILED], [n for n in names if n not in TILED]):
        order = sorted(subset)
        rng.shuffle(order)
        for i, name in enumerate(order):
            out[name] = HALVES[i % 2]
    return out


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def build(seed: int = 0, copies: int = 8, original_side: int = 768, photos: int = 0,
          families: tuple[str, ...] = FAMILIES, halves: tuple[str, ...] = HALVES,
          low_texture: bool = False) -> list[BenchImage]:  # fmt: skip
    """Build the benchmark: originals and ``copies`` edited copies per group (families dealt round-robin).

    ``photos`` > 0 keeps that many source photos of each half, a third of them tiled (a reduced benchmark);
    ``halves`` selects the halves built; ``low_texture`` builds the :data:`LOW_TEXTURE` graphics instead of the
    photos. Deterministic for a given argument set.
    """
    unknown = set(families) - set(EDITS)
    if unknown or not families:
        raise ValueError(f"unknown edit families {sorted(unknown)}; known: {list(FAMILIES)}")
    sources = source_photos(low_texture=low_texture)
    half_of = split_photos([n for n, _ in sources], seed)
    keep = {n for n, _ in sources if half_of[n] in halves}
    if photos:  # per half: a third of the photos tiled ones (look-alikes), the rest whole photos, in source order
        keep = set()
        for half in halves:
            names = [n for n, _ in sources if half_of[n] == half]
            tiled = [n for n in names if n in TILED][: max(1, photos // 3)]
            keep |= {*tiled, *[n for n in names if n not in TILED][: photos - len(tiled)]}
    taken: dict[str, int] = {}
    groups: list[tuple[str, str, Image.Image]] = []
    for name, img in sources:
        if name not in keep:
            continue
        taken[half_of[name]] = taken.get(half_of[name], 0) + 1
        if name in TILED:
            groups += [(f"{name}#{i}", name, t) for i, t in enumerate(_tiles(img))]
        else:
            groups.append((name, name, img))
    deck = list(families)
    random.Random(seed).shuffle(deck)
    out: list[BenchImage] = []
    turn = 0
    for group, photo, img in groups:
        half = half_of[photo]
        orig = _thumb(img, original_side)
        out.append(BenchImage(key=f"{group}/original", group=group, photo=photo, family="original", half=half,
                              data=encode(orig, quality=92)))  # fmt: skip
        for _ in range(min(copies, len(deck))):
            family = deck[turn % len(deck)]
            turn += 1
            rng = random.Random(_seed(seed, group, family))
            edited = EDITS[family](orig, rng)
            fmt = "PNG" if family == "border" and rng.random() < 0.5 else "JPEG"
            data = encode(edited, fmt, quality=rng.randint(70, 95)) if family not in ("jpeg", "combo") else \
                encode(edited, quality=95)  # already carries its own (low-quality) JPEG round trip
            out.append(BenchImage(key=f"{group}/{family}", group=group, photo=photo, family=family, half=half,
                                  data=data))  # fmt: skip
    log.info("copy benchmark: %d images in %d groups from %d photos", len(out), len(groups), len(taken))
    return out
