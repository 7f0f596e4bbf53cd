"""Curation test fixtures: one in-process Ray per session, and real photos with synthetic copies."""

from __future__ import annotations

import glob
import io
import os
import random
import time
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from curation.ray.local_cluster import process_tree, stop_processes
from curation.stages.base import LocalExecutor

__all__ = ["process_tree", "stop_processes"]  # re-exported: Ray-stopping helpers live with the cluster harness

REPO = Path(__file__).resolve().parents[2]
MATE = sorted(glob.glob("/usr/share/backgrounds/mate/nature/*.jpg"))
# skimage sample photos (``cat`` is ``chelsea`` again, so it is left out).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "brick", "grass", "gravel",
                  "clock", "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle")  # fmt: skip


@lru_cache(maxsize=4)
def photos(max_side: int = 512) -> tuple[tuple[str, Image.Image], ...]:
    """The 15 skimage sample photos and 12 mate backgrounds as RGB images with the long side <= ``max_side``."""
    import skimage.data

    out = []
    for name in SKIMAGE_PHOTOS:
        arr = getattr(skimage.data, name)()
        arr = arr[0] if isinstance(arr, tuple) else arr
        im = Image.fromarray(arr).convert("RGB")
        im.thumbnail((max_side, max_side))
        out.append((name, im))
    for path in MATE:
        im = Image.open(path)
        im.draft("RGB", (max_side, max_side))
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        out.append((Path(path).stem, im))
    return tuple(out)


def jpeg_bytes(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_copy(im: Image.Image, rng: random.Random) -> tuple[bytes, list[str]]:
    """A near-duplicate: 2-4 of JPEG q30-90, rescale to 50-90%, crop <=10% per side, h-flip, +-20%
    brightness/contrast, grayscale; returns JPEG bytes and the edits applied."""
    ops = rng.sample(["jpeg", "scale", "crop", "flip", "bc", "gray"], k=rng.randint(2, 4))
    for op in ops:
        if op == "scale":
            s = rng.uniform(0.5, 0.9)
            im = im.resize((max(1, int(im.width * s)), max(1, int(im.height * s))), Image.BILINEAR)
        elif op == "crop":
            w, h = im.size
            left, top, right, bottom = (rng.uniform(0, 0.1) for _ in range(4))
            im = im.crop((int(left * w), int(top * h), w - int(right * w), h - int(bottom * h)))
        elif op == "flip":
            im = ImageOps.mirror(im)
        elif op == "bc":
            im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
            im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
        elif op == "gray":
            im = ImageOps.grayscale(im).convert("RGB")
    return jpeg_bytes(im, rng.randint(30, 90) if "jpeg" in ops else 92), ops


def write_copy_corpus(root: Path, originals: int, copies: int, seed: int = 0, max_side: int = 384) -> dict[str, int]:
    """Write ``originals`` photos (each with ``copies`` near-duplicates for two of every three photos) as JPEGs
    under ``root``; return ``{file path: group id}``, the ground truth of copy detection."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth: dict[str, int] = {}
    for g, (name, im) in enumerate(photos()[:originals]):
        im = im.copy()
        im.thumbnail((max_side, max_side))
        path = root / f"{name}.jpg"
        path.write_bytes(jpeg_bytes(im))
        truth[str(path)] = g
        for c in range(copies if g % 3 else 0):
            data, _ = make_copy(im, rng)
            path = root / f"{name}_copy{c}.jpg"
            path.write_bytes(data)
            truth[str(path)] = g
    return truth


# Embedder plugins (``embed.model = "plugin"``, ``embed.factory = "tests.curation.conftest:<name>"``): the built-in
# descriptor with test behaviour, so runs can be interrupted at a chosen point.
def slow_descriptor(cfg, device):
    """The descriptor, sleeping ``$CURATION_TEST_EMBED_DELAY`` seconds per batch (to kill a run mid-embed)."""
    from curation.models.descriptor import DescriptorEmbedder

    class Slow(DescriptorEmbedder):
        def embed(self, batch):
            time.sleep(float(os.environ.get("CURATION_TEST_EMBED_DELAY", "0")))
            return super().embed(batch)

    return Slow()


def crash_once_descriptor(cfg, device):
    """The descriptor, but the first worker to embed kills its own process (flag file at ``cfg.weights``)."""
    from curation.models.descriptor import DescriptorEmbedder

    class CrashOnce(DescriptorEmbedder):
        def embed(self, batch):
            flag = Path(cfg.weights)
            if not flag.exists():
                flag.write_text(str(os.getpid()))
                os._exit(1)
            return super().embed(batch)

    return CrashOnce()


class Killed(RuntimeError):
    """Raised by :class:`DyingExecutor` in place of a killed driver."""


class DyingExecutor(LocalExecutor):
    """Raises :class:`Killed` (like a killed driver) once ``after`` parts of the step named ``step`` finished."""

    def __init__(self, step: str, after: int) -> None:
        self.step, self.after = step, after

    def map(self, fn, items, *, desc, num_cpus=1):
        for i, item in enumerate(items):
            if desc.endswith(":" + self.step) and i == self.after:
                raise Killed(desc)
            yield fn(item)
