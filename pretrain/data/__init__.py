"""Training data: WebDataset loading, multi-crop augmentation, masking and collate."""

from .augment import MultiCropAugment, MultiCropConfig, decode_for_crops
from .collate import collate_multicrop
from .loader import WdsLoader
from .wds import WdsConfig

__all__ = ["MultiCropAugment", "MultiCropConfig", "WdsConfig", "WdsLoader", "collate_multicrop", "decode_for_crops"]
