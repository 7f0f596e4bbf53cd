"""The evaluation transform: resize the short side, centre crop, ImageNet normalisation (PIL bicubic)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_resize_size(image_size: int) -> int:
    """Short side before the centre crop: the 256/224 ratio of the crop (224 -> 256, 56 -> 64)."""
    return int(round(image_size * 256 / 224))


class EvalTransform:
    """PIL image -> normalised ``(3, S, S)`` float tensor.

    The short side is resized to ``resize_size`` with bicubic filtering (aspect kept), then the central
    ``image_size`` square is cropped, scaled to [0, 1] and normalised with the ImageNet mean and std.
    """

    def __init__(self, image_size: int = 224, resize_size: int | None = None) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        self.image_size = image_size
        self.resize_size = resize_size if resize_size is not None else default_resize_size(image_size)
        if self.resize_size < image_size:
            raise ValueError(f"resize_size {self.resize_size} must be >= image_size {image_size}")
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        """The geometric part: RGB, short side to ``resize_size`` (bicubic), central ``image_size`` crop."""
        img = img.convert("RGB")
        w, h = img.size
        scale = self.resize_size / min(w, h)
        new_w, new_h = max(self.resize_size, round(w * scale)), max(self.resize_size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        left = int(round((new_w - self.image_size) / 2.0))
        top = int(round((new_h - self.image_size) / 2.0))
        return img.crop((left, top, left + self.image_size, top + self.image_size))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(self.resize_crop(img), dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).permute(2, 0, 1)
        return (x - self._mean) / self._std

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, resize_size={self.resize_size}, bicubic)"
