"""DINOv2 multi-crop augmentation with PIL decoding and numpy/torch pixel ops (no torchvision).

Each sample gives 2 global crops and ``n_local`` local crops. Every view goes through a bicubic (antialiased,
PIL-equivalent) RandomResizedCrop, a horizontal flip, colour jitter (random order of brightness, contrast,
saturation, hue), random grayscale, Gaussian blur (9-tap kernel, sigma in [0.1, 2], reflect padding) and, for
the second global crop, solarisation, then ImageNet normalisation. All randomness comes from the
``numpy.random.Generator`` passed in, so a sample's crops are a pure function of (image, generator seed).

The blur probabilities default to the values the DINOv2 paper states (global 1: 1.0, global 2: 0.1,
local: 0.5). ``official_blur_inversion=True`` reproduces the released code, whose ``GaussianBlur(p)`` applies
the blur with probability ``1 - p`` (global 1 never, global 2 90 %, local 50 %).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugment",
    "MultiCropConfig",
    "ViewOps",
    "decode_for_crops",
    "sample_crop_box",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BLUR_RADIUS = 4  # 9-tap kernel, as the official torchvision GaussianBlur(kernel_size=9)


def _check_range(name: str, value: tuple[float, float], lo: float, hi: float) -> None:
    if len(value) != 2 or not (lo <= value[0] <= value[1] <= hi):
        raise ValueError(f"{name} must be (min, max) with {lo} <= min <= max <= {hi}, got {value}")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


@dataclass(kw_only=True)
class MultiCropConfig:
    """Multi-crop augmentation settings (defaults: DINOv2 ViT-*/14)."""

    global_size: int = 224
    """Side of the two square global crops, in pixels."""
    global_scale: tuple[float, float] = (0.32, 1.0)
    """RandomResizedCrop area fraction range for global crops."""
    local_size: int = 98
    """Side of the square local crops, in pixels (98 = 7 x 14 patches)."""
    local_scale: tuple[float, float] = (0.05, 0.32)
    """RandomResizedCrop area fraction range for local crops."""
    n_local: int = 8
    """Number of local crops per sample (0 disables them)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range (w / h), sampled log-uniformly."""
    flip_p: float = 0.5
    """Probability of a horizontal flip, per view."""
    jitter_p: float = 0.8
    """Probability of applying colour jitter, per view."""
    brightness: float = 0.4
    """Brightness jitter: factor uniform in [max(0, 1 - b), 1 + b]."""
    contrast: float = 0.4
    """Contrast jitter: factor uniform in [max(0, 1 - c), 1 + c]."""
    saturation: float = 0.2
    """Saturation jitter: factor uniform in [max(0, 1 - s), 1 + s]."""
    hue: float = 0.1
    """Hue jitter: shift uniform in [-h, h] of a full turn (h <= 0.5)."""
    grayscale_p: float = 0.2
    """Probability of converting a view to 3-channel grayscale."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Gaussian blur sigma range (uniform), in pixels of the output crop."""
    blur_p_global1: float = 1.0
    """Blur probability of the first global crop, as the paper states it."""
    blur_p_global2: float = 0.1
    """Blur probability of the second global crop, as the paper states it."""
    blur_p_local: float = 0.5
    """Blur probability of each local crop, as the paper states it."""
    solarize_p: float = 0.2
    """Solarisation probability of the second global crop (other views are never solarised)."""
    solarize_threshold: int = 128
    """Pixels >= this value (0-255) are inverted by solarisation."""
    official_blur_inversion: bool = False
    """Apply blur with probability 1 - p, as the released DINOv2 code does (parity with its checkpoints)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean (0-1 scale)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation std (0-1 scale)."""
    decode_min_size: int = 0
    """Smallest short side JPEG draft decoding may reduce an image to; 0 = derived from the crop sizes."""
    global_size_choices: tuple[int, ...] = ()
    """Mixed resolutions (DINOv3's high-resolution adaptation): each batch draws its global crop size from these
    (seeded by the batch index, so every rank and a resume draw the same); () = always ``global_size``."""
    local_size_choices: tuple[int, ...] = ()
    """Likewise for the local crop size; () = always ``local_size``."""
    hires_factor: int = 1
    """Global crops are rendered at this multiple of their size for a method that feeds them to a higher-resolution
    teacher (DINOv2 with Gram anchoring: the Gram teacher sees them, the other networks a downscaled copy)."""

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {self.n_local}")
        _check_range("global_scale", self.global_scale, 1e-6, 1.0)
        _check_range("local_scale", self.local_scale, 1e-6, 1.0)
        _check_range("ratio", self.ratio, 1e-3, 1e3)
        _check_range("blur_sigma", self.blur_sigma, 1e-3, 100.0)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p_global1", "blur_p_global2", "blur_p_local",
                     "solarize_p"):
            _check_prob(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(f"solarize_threshold must be in [0, 256], got {self.solarize_threshold}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must have 3 values with std > 0, got {self.mean}, {self.std}")
        if self.decode_min_size < 0:
            raise ValueError(f"decode_min_size must be >= 0 (0 = auto), got {self.decode_min_size}")
        self.global_size_choices = tuple(int(v) for v in self.global_size_choices)
        self.local_size_choices = tuple(int(v) for v in self.local_size_choices)
        for name in ("global_size_choices", "local_size_choices"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must all be >= 1, got {getattr(self, name)}")
        if self.hires_factor < 1:
            raise ValueError(f"hires_factor must be >= 1, got {self.hires_factor}")

    def for_batch(self, rng: np.random.Generator) -> MultiCropConfig:
        """The crops of one batch: sizes drawn from the choices (this config itself when there are none)."""
        if not self.global_size_choices and not self.local_size_choices:
            return self
        g = int(rng.choice(self.global_size_choices)) if self.global_size_choices else self.global_size
        loc = int(rng.choice(self.local_size_choices)) if self.local_size_choices else self.local_size
        return replace(self, global_size=g, local_size=loc, global_size_choices=(), local_size_choices=())

    @property
    def blur_probabilities(self) -> tuple[float, float, float]:
        """Effective blur probabilities (global 1, global 2, local) after the optional official inversion."""
        ps = (self.blur_p_global1, self.blur_p_global2, self.blur_p_local)
        return tuple(1.0 - p for p in ps) if self.official_blur_inversion else ps  # type: ignore[return-value]

    @property
    def min_decode_side(self) -> int:
        """Short side below which draft decoding must not go: the smallest crop of each kind is not upsampled."""
        if self.decode_min_size:
            return self.decode_min_size
        need = [max((self.global_size, *self.global_size_choices)) / math.sqrt(self.global_scale[0])]
        if self.n_local:
            need.append(max((self.local_size, *self.local_size_choices)) / math.sqrt(self.local_scale[0]))
        return int(math.ceil(max(need)))


@dataclass(frozen=True)
class ViewOps:
    """What was applied to one view (returned with ``return_ops=True``; used by tests and debugging)."""

    kind: str  #: "global1", "global2" or "local"
    box: tuple[int, int, int, int]  #: crop (left, top, width, height) in decoded-image pixels
    flip: bool  #: horizontally flipped
    jitter: tuple[tuple[str, float], ...] = field(default=())  #: (op, factor) in applied order; () = not applied
    grayscale: bool = False  #: converted to grayscale
    blur_sigma: float | None = None  #: Gaussian blur sigma, None = not blurred
    solarize: bool = False  #: solarised


def decode_for_crops(data: bytes, min_size: int) -> Image.Image:
    """Decode image bytes to RGB; JPEGs use draft mode (DCT scaling) keeping both sides >= ``min_size``.

    Draft mode only reduces by 1/2, 1/4 or 1/8 and never below the requested size, so the decoded image still
    holds every pixel the largest crop needs while large photos decode several times faster. Raises
    ``PIL.UnidentifiedImageError``/``OSError`` for undecodable or truncated data.
    """
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and min_size > 0 and min(img.size) >= 2 * min_size:
        img.draft("RGB", (min_size, min_size))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def sample_crop_box(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (left, top, w, h): 10 tries of area x log-uniform ratio, then a centre crop."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_HUE_OFFSETS = np.array([5.0, 3.0, 1.0], dtype=np.float32).reshape(3, 1, 1)


class _Workspace:
    """Preallocated float32 buffers for ``n_views`` views of one size (page faults of fresh large arrays would
    dominate otherwise). Colour ops act on the selected view ``x``; blur, solarise and normalise run batched."""

    def __init__(self, size: int, n_views: int) -> None:
        s, r = size, min(_BLUR_RADIUS, size - 1)
        self.size, self.r = s, r
        self.stage = torch.empty((n_views, 3, s, s), dtype=torch.float32)  # the views, CHW, 0-255
        self.stage_np = self.stage.numpy()  # shares memory
        self.x = self.stage_np[0]
        self.t3 = np.empty((3, s, s), np.float32)
        self.u3 = np.empty((3, s, s), np.float32)
        self.planes = [np.empty((s, s), np.float32) for _ in range(4)]
        self.mask = np.empty((s, s), bool)
        self.mask3 = np.empty((3, s, s), bool)
        self.pad_v = torch.empty((n_views, 3, s + 2 * r, s), dtype=torch.float32)
        self.pad_h = torch.empty((n_views, 3, s, s + 2 * r), dtype=torch.float32)
        self.blurred = torch.empty((n_views, 3, s, s), dtype=torch.float32)

    def select(self, i: int) -> None:
        """Make view ``i`` the target of the colour ops."""
        self.x = self.stage_np[i]

    def gray(self, out: np.ndarray) -> np.ndarray:
        """Luma of ``self.x`` into ``out`` (one plane)."""
        x, tmp = self.x, self.planes[3]
        np.multiply(x[0], _GRAY[0], out=out)
        np.multiply(x[1], _GRAY[1], out=tmp)
        out += tmp
        np.multiply(x[2], _GRAY[2], out=tmp)
        out += tmp
        return out

    def brightness(self, f: float) -> None:
        self.x *= f
        np.minimum(self.x, 255.0, out=self.x)

    def contrast(self, f: float) -> None:
        mean = float(np.dot(_GRAY, self.x.mean(axis=(1, 2))))
        self.x *= f
        self.x += (1.0 - f) * mean
        np.clip(self.x, 0.0, 255.0, out=self.x)

    def saturation(self, f: float) -> None:
        gray = self.gray(self.planes[0])
        gray *= 1.0 - f
        self.x *= f
        self.x += gray
        np.clip(self.x, 0.0, 255.0, out=self.x)

    def hue(self, shift: float) -> None:
        """Rotate the HSV hue by ``shift`` turns keeping S and V (exact float HSV, no 8-bit quantisation)."""
        x, (mx, c, h, tmp), m = self.x, self.planes, self.mask
        r, g, b = x[0], x[1], x[2]
        np.maximum(r, g, out=mx)
        np.maximum(mx, b, out=mx)
        np.minimum(r, g, out=c)
        np.minimum(c, b, out=c)
        np.subtract(mx, c, out=c)  # chroma
        # hue * chroma in sextants: blue max -> (r-g)+4c, green max -> (b-r)+2c, red max -> (g-b); red wins ties
        np.multiply(c, 4.0, out=tmp)
        np.subtract(r, g, out=h)
        h += tmp
        np.multiply(c, 2.0, out=tmp)
        tmp += b
        tmp -= r
        np.equal(mx, g, out=m)
        self._select(h, tmp, m)
        np.subtract(g, b, out=tmp)
        np.equal(mx, r, out=m)
        self._select(h, tmp, m)
        np.maximum(c, 1e-6, out=tmp)  # grey pixels: h = 0 and the output is V whatever the hue
        h /= tmp
        h += 6.0 * shift + 12.0  # keep it positive for the floor-based modulo (masked ufuncs are slow)
        k, f = self.t3, self.u3
        np.add(h, _HUE_OFFSETS, out=k)  # HSV -> RGB: channel = V - C * clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6
        np.multiply(k, 1.0 / 6.0, out=f)
        np.floor(f, out=f)
        f *= 6.0
        k -= f
        np.subtract(4.0, k, out=f)
        np.minimum(k, f, out=k)
        np.clip(k, 0.0, 1.0, out=k)
        k *= c
        np.subtract(mx, k, out=x)

    def _select(self, dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> None:
        """``dst[mask] = src[mask]`` as dst += mask * (src - dst): SIMD ufuncs, unlike masked (where=) ones."""
        np.subtract(src, dst, out=src)
        np.multiply(src, mask, out=src)
        dst += src

    def grayscale(self) -> None:
        self.x[:] = self.gray(self.planes[0])

    def blur(self, views: list[int], sigmas: list[float]) -> None:
        """Separable 9-tap Gaussian with reflect padding of several views at once (one sigma each), in place;
        a shorter kernel on views under 9 pixels. Torch fused multiply-adds, batched over the views."""
        r, s, n = self.r, self.size, len(views)
        if r < 1 or n == 0:
            return
        kernels = np.stack([_gaussian_kernel(sigma)[_BLUR_RADIUS - r : _BLUR_RADIUS + r + 1] for sigma in sigmas])
        k = torch.from_numpy(kernels / kernels.sum(axis=1, keepdims=True)).view(n, 2 * r + 1, 1, 1, 1)
        index = torch.tensor(views, dtype=torch.long)
        x, y = self.stage.index_select(0, index), self.blurred[:n]
        for pad, dim in ((self.pad_v[:n], 2), (self.pad_h[:n], 3)):
            pad.narrow(dim, r, s).copy_(x)
            pad.narrow(dim, 0, r).copy_(x.narrow(dim, 1, r).flip(dim))
            pad.narrow(dim, r + s, r).copy_(x.narrow(dim, s - 1 - r, r).flip(dim))
            torch.mul(pad.narrow(dim, 0, s), k[:, 0], out=y)
            for i in range(1, 2 * r + 1):
                y.addcmul_(pad.narrow(dim, i, s), k[:, i])
            x = y
        self.stage.index_copy_(0, index, y)

    def solarize(self, threshold: float) -> None:
        np.greater_equal(self.x, threshold, out=self.mask3)
        np.multiply(self.x, -2.0, out=self.t3)
        self.t3 += 255.0
        self.t3 *= self.mask3
        self.x += self.t3  # x -> 255 - x where x >= threshold


def _gaussian_kernel(sigma: float) -> np.ndarray:
    x = np.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _as_tensor(img: Image.Image) -> torch.Tensor:
    """Zero-copy (1, 3, H, W) channels-last uint8 view of an RGB image (read only; never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the PIL buffer is read-only
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1).unsqueeze(0)


def _resize(crop: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a (1, 3, h, w) uint8 crop to (size, size): PIL's filter (a = -0.5, support
    scaled with the reduction), run by torch's vectorised uint8 channels-last kernel (about 6x PIL's speed)."""
    crop = crop.contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


class MultiCropAugment:
    """Callable ``(PIL image, Generator) -> {"global": [t, t], "local": [t] * n_local}`` of normalised tensors.

    Tensors are float32 ``(3, size, size)``. With ``return_ops=True`` the result also has ``"ops"``: a
    ``ViewOps`` per view, in the order global1, global2, local crops. Photometric ops follow torchvision's
    float-tensor semantics (values clamped after each jitter op, no 8-bit rounding in between). An instance
    keeps scratch buffers: use one per thread (each DataLoader worker has its own copy).
    """

    _JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

    def __init__(self, cfg: MultiCropConfig) -> None:
        self.cfg = cfg
        self._scale = 1.0 / (torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1) * 255.0)
        self._bias = -torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1) * 255.0 * self._scale
        self._blur_p = cfg.blur_probabilities
        self._work: dict[tuple[int, int], _Workspace] = {}
        lo = [max(0.0, 1 - cfg.brightness), max(0.0, 1 - cfg.contrast), max(0.0, 1 - cfg.saturation), -cfg.hue]
        hi = [1 + cfg.brightness, 1 + cfg.contrast, 1 + cfg.saturation, cfg.hue]
        self._jitter_lo, self._jitter_hi = np.asarray(lo), np.asarray(hi)

    def __call__(self, img: Image.Image, rng: np.random.Generator, *, return_ops: bool = False) -> dict:
        if img.mode != "RGB":
            img = img.convert("RGB")
        cfg = self.cfg
        src = _as_tensor(img)
        globals_ = torch.empty((2, 3, cfg.global_size, cfg.global_size), dtype=torch.float32)
        locals_ = torch.empty((cfg.n_local, 3, cfg.local_size, cfg.local_size), dtype=torch.float32)
        ws = self._workspace(cfg.global_size, 2)
        ops = [self._view(src, rng, "global1", ws, 0, cfg.global_scale, self._blur_p[0], 0.0),
               self._view(src, rng, "global2", ws, 1, cfg.global_scale, self._blur_p[1], cfg.solarize_p)]
        self._finish(ws, ops, globals_)
        if cfg.n_local:
            ws = self._workspace(cfg.local_size, cfg.n_local)
            local_ops = [self._view(src, rng, "local", ws, i, cfg.local_scale, self._blur_p[2], 0.0)
                         for i in range(cfg.n_local)]
            self._finish(ws, local_ops, locals_)
            ops += local_ops
        out = {"global": list(globals_.unbind(0)), "local": list(locals_.unbind(0))}
        if return_ops:
            out["ops"] = ops
        return out

    def _workspace(self, size: int, n_views: int) -> _Workspace:
        if (size, n_views) not in self._work:
            self._work[size, n_views] = _Workspace(size, n_views)
        return self._work[size, n_views]

    def _finish(self, ws: _Workspace, ops: list[ViewOps], out: torch.Tensor) -> None:
        """Blur, solarise (after the blur, as the official order) and normalise a group of views into ``out``."""
        blurred = [i for i, op in enumerate(ops) if op.blur_sigma is not None]
        ws.blur(blurred, [ops[i].blur_sigma for i in blurred])
        for i, op in enumerate(ops):
            if op.solarize:
                ws.select(i)
                ws.solarize(self.cfg.solarize_threshold)
        torch.addcmul(self._bias, ws.stage[: len(ops)], self._scale, out=out)  # (x - 255 mean) / (255 std)

    def _view(self, src: torch.Tensor, rng: np.random.Generator, kind: str, ws: _Workspace, i: int,
              scale: tuple[float, float], blur_p: float, solarize_p: float) -> ViewOps:
        """Crop, flip and colour-jitter view ``i`` into the workspace; draw (not yet apply) blur and solarise."""
        cfg = self.cfg
        box = sample_crop_box(rng, src.shape[-1], src.shape[-2], scale, cfg.ratio)
        left, top, w, h = box
        view = _resize(src[:, :, top : top + h, left : left + w], ws.size)[0]
        flip = bool(rng.random() < cfg.flip_p)
        ws.stage[i].copy_(view.flip(-1) if flip else view)
        ws.select(i)
        jitter: tuple[tuple[str, float], ...] = ()
        if rng.random() < cfg.jitter_p:
            order = rng.permutation(4)
            factors = rng.uniform(self._jitter_lo, self._jitter_hi)
            jitter = tuple((self._JITTER_OPS[j], float(factors[j])) for j in order)
            for op, factor in jitter:
                getattr(ws, op)(factor)
        gray = bool(rng.random() < cfg.grayscale_p)
        if gray:
            ws.grayscale()
        sigma = float(rng.uniform(*cfg.blur_sigma)) if rng.random() < blur_p else None
        solarize = bool(solarize_p > 0 and rng.random() < solarize_p)
        return ViewOps(kind=kind, box=box, flip=flip, jitter=jitter, grayscale=gray, blur_sigma=sigma,
                       solarize=solarize)
