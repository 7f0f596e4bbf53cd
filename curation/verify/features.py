"""Local features for copy verification: SIFT keypoints and descriptors of a downscaled grayscale image.

:func:`extract` converts the picture to grayscale, downscales it (area interpolation) so its long side is at most
``VerifyConfig.max_side`` *before* detection, and keeps the ``max_features`` strongest SIFT keypoints. The result,
:class:`LocalFeatures`, is a few numpy arrays (about 140 bytes a keypoint: 128 uint8 descriptor bins + 4 float32
keypoint numbers), picklable and convertible to plain bytes (:meth:`LocalFeatures.to_bytes`) so a task can cache
it per image.

The horizontally mirrored image's features are derived, not re-detected (:meth:`LocalFeatures.mirrored`): a
mirror maps a keypoint (x, y, angle) to (w - 1 - x, y, 180 - angle), and its SIFT descriptor to the same 4 x 4 x 8
histogram with the spatial rows reversed and the orientation bins negated (bin k -> -k mod 8). That mapping is
exact up to interpolation: on real photos a permuted descriptor differs from the one SIFT computes on the
mirrored image by ~4% of its norm, far below the distance between different keypoints.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np
from PIL import Image

from curation.config import VerifyConfig

__all__ = ["LocalFeatures", "extract", "gray_array"]

log = logging.getLogger(__name__)

#: SIFT descriptor index permutation of a horizontal mirror: rows reversed, orientation bin k -> -k mod 8.
_MIRROR = np.arange(128).reshape(4, 4, 8)[::-1][:, :, (-np.arange(8)) % 8].reshape(-1)
_MAGIC = b"LF2\0"
#: Long side of the thumbnail kept for the dense agreement check (4 KiB at most).
THUMB_SIDE = 64


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints and descriptors of one image (downscaled to ``width`` x ``height``)."""

    keypoints: np.ndarray
    """(n, 4) float32: x, y (pixels of the downscaled image), size (diameter, pixels), angle (degrees)."""
    descriptors: np.ndarray
    """(n, 128) uint8 SIFT descriptors."""
    width: int
    """Width of the image the keypoints were detected on."""
    height: int
    """Height of the image the keypoints were detected on."""
    thumb: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    """Grayscale thumbnail (long side :data:`THUMB_SIDE`, uint8) for the dense agreement check."""

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return int(self.keypoints.nbytes + self.descriptors.nbytes)

    @cached_property
    def rooted(self) -> np.ndarray:
        """RootSIFT descriptors (L1-normalised, square-rooted: unit L2 norm), float32, computed once per image."""
        d = self.descriptors.astype(np.float32)
        d /= d.sum(axis=1, keepdims=True) + 1e-7
        return np.sqrt(d)

    @cached_property
    def mirror(self) -> LocalFeatures:
        """:meth:`mirrored`, computed once per image."""
        return self.mirrored()

    def mirrored(self) -> LocalFeatures:
        """The features of the horizontally mirrored image (derived exactly, no detection)."""
        kp = self.keypoints.copy()
        kp[:, 0] = (self.width - 1) - kp[:, 0]
        kp[:, 3] = np.mod(180.0 - kp[:, 3], 360.0)
        desc = np.ascontiguousarray(self.descriptors[:, _MIRROR])
        return LocalFeatures(kp, desc, self.width, self.height, np.ascontiguousarray(self.thumb[:, ::-1]))

    def to_bytes(self) -> bytes:
        """Compact serialisation (header + raw arrays), read back by :meth:`from_bytes`."""
        th, tw = self.thumb.shape
        head = np.array([len(self), self.width, self.height, th, tw], np.int32).tobytes()
        body = self.keypoints.astype(np.float32).tobytes() + self.descriptors.tobytes()
        return _MAGIC + head + body + np.ascontiguousarray(self.thumb, np.uint8).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalFeatures:
        """Inverse of :meth:`to_bytes`."""
        if data[:4] != _MAGIC:
            raise ValueError("not a LocalFeatures blob")
        n, w, h, th, tw = (int(v) for v in np.frombuffer(data, np.int32, 5, 4))
        off = 24
        kp = np.frombuffer(data, np.float32, n * 4, off).reshape(n, 4).copy()
        desc = np.frombuffer(data, np.uint8, n * 128, off + n * 16).reshape(n, 128).copy()
        thumb = np.frombuffer(data, np.uint8, th * tw, off + n * 144).reshape(th, tw).copy()
        return cls(kp, desc, w, h, thumb)

    @classmethod
    def empty(cls, width: int = 0, height: int = 0) -> LocalFeatures:
        """Features of an image where nothing was detected."""
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.uint8), width, height)


def gray_array(img: Image.Image | bytes, max_side: int) -> np.ndarray:
    """Grayscale uint8 array of ``img`` (a PIL image or encoded bytes) with long side <= ``max_side``.

    Encoded JPEGs are decoded at a reduced DCT scale when that still leaves at least ``max_side`` pixels.
    """
    if isinstance(img, bytes | bytearray):
        pic = Image.open(io.BytesIO(img))
        pic.draft("L", (max_side, max_side))
        img = pic
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGBA") if "A" in img.getbands() or "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGBA":
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
    a = np.asarray(img.convert("L"), dtype=np.uint8)
    h, w = a.shape
    s = max_side / max(h, w, 1)
    if s < 1.0:
        a = cv2.resize(a, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return _stretch(a)


def _stretch(a: np.ndarray) -> np.ndarray:
    """Stretch the 1st..99th luminance percentiles to 0..255: contrast edits and dull, hazy or low-contrast pictures
    then give the keypoints a well-exposed one would (SIFT's contrast threshold is absolute)."""
    hist = np.bincount(a.ravel(), minlength=256).cumsum()
    lo, hi = int(np.searchsorted(hist, 0.01 * hist[-1])), int(np.searchsorted(hist, 0.99 * hist[-1]))
    if hi - lo < 2:
        return np.ascontiguousarray(a)
    lut = np.clip((np.arange(256) - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(lut[a])


_DETECTORS: dict[tuple[int, float], cv2.SIFT] = {}


def _sift(cfg: VerifyConfig) -> cv2.SIFT:
    key = (cfg.max_features, cfg.contrast_threshold)
    if key not in _DETECTORS:
        _DETECTORS[key] = cv2.SIFT_create(nfeatures=cfg.max_features, contrastThreshold=cfg.contrast_threshold)
    return _DETECTORS[key]


def extract(img: Image.Image | bytes | np.ndarray, cfg: VerifyConfig) -> LocalFeatures:
    """Local features of ``img`` (PIL image, encoded bytes or a grayscale uint8 array already downscaled).

    Never raises for degenerate pictures (tiny, uniform) or unreadable bytes: they give few or no keypoints.
    """
    try:
        a = img if isinstance(img, np.ndarray) else gray_array(img, cfg.max_side)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("cannot read an image for verification: %s", exc)
        return LocalFeatures.empty()
    h, w = a.shape[:2]
    if min(h, w) < 8:
        return LocalFeatures.empty(w, h)
    s = THUMB_SIDE / max(h, w)
    thumb = cv2.resize(a, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    kps, desc = _sift(cfg).detectAndCompute(a, None)
    if desc is None or not kps:
        return LocalFeatures(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.uint8), w, h, thumb)
    kps, desc = kps[: cfg.max_features], desc[: cfg.max_features]  # SIFT can return a few extra on ties
    kp = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in kps], np.float32).reshape(-1, 4)
    return LocalFeatures(kp, np.clip(np.rint(desc), 0, 255).astype(np.uint8), w, h, thumb)
