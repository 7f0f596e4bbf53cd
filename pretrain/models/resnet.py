"""ResNet backbones with torchvision's parameter names, free of any parallelism.

Layout (so public ResNet checkpoints load strictly): ``conv1``, ``bn1``, ``layer1`` .. ``layer4`` of residual blocks
(``conv1``/``bn1``, ``conv2``/``bn2`` [, ``conv3``/``bn3``], ``downsample.0`` conv + ``downsample.1`` norm) and an
optional ``fc`` classifier (absent when ``num_classes == 0``, as in self-supervised releases). Bottlenecks stride
in their 3x3 convolution (the "v1.5" variant torchvision and the SSL methods use).

Stems: ``"imagenet"`` (7x7 stride-2 convolution + 3x3 stride-2 max pool, output stride 32) and ``"small"``
(3x3 stride-1 convolution, no pool, output stride 8) for 28-64 px inputs. The backbone API mirrors the ViTs':
``forward_features`` returns the same dict, with the global-average-pooled feature as ``x_norm_clstoken`` and the
last feature map, flattened, as ``x_norm_patchtokens`` (there is no final norm: "norm" only names the keys).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: depth -> (block kind, residual blocks per stage)
LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STEMS = ("imagenet", "small")
NORMS = ("bn", "syncbn", "layernorm")


@dataclass(kw_only=True)
class ResNetConfig:
    """Architecture of a ResNet backbone."""

    depth: int = 50
    "18, 34 (basic blocks), 50 or 101 (bottlenecks)."
    stem: str = "imagenet"
    "'imagenet' (7x7/2 conv + max pool) or 'small' (3x3/1 conv, no pool; 28-64 px inputs)."
    norm: str = "bn"
    """'bn' (BatchNorm2d), 'syncbn' (SyncBatchNorm: batch statistics over the process group on GPU) or 'layernorm'
    (GroupNorm with one group: per-sample statistics over channels and positions, as CPC v2's encoder)."""
    width: int = 64
    "Channels of the stem and of layer1's 3x3 convolutions; each later stage doubles them."
    num_classes: int = 0
    "Classes of the ``fc`` classifier; 0 means no ``fc`` (a backbone: ``forward`` gives the pooled feature)."
    zero_init_residual: bool = False
    "Start the last norm of every residual block at gamma 0 (each block starts as the identity)."
    drop_path_rate: float = 0.0
    "Stochastic depth: probability of dropping a residual branch per sample in training, uniform over blocks."
    in_chans: int = 3
    "Input channels."

    def __post_init__(self) -> None:
        if self.depth not in LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(LAYOUTS)}, got {self.depth}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        for name in ("width", "in_chans"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def expansion(self) -> int:
        """Output channels / inner width of a block (1 for basic blocks, 4 for bottlenecks)."""
        return 1 if LAYOUTS[self.depth][0] == "basic" else 4

    @property
    def embed_dim(self) -> int:
        """Channels of the last stage (512 for ResNet-18/34, 2048 for ResNet-50/101 at width 64)."""
        return self.width * 8 * self.expansion


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2-D batch norm (torchvision's eps 1e-5 and momentum 0.1), or a per-sample layer norm over (C, H, W)."""
    if kind == "layernorm":
        return nn.GroupNorm(1, channels)
    return nn.SyncBatchNorm(channels) if kind == "syncbn" else nn.BatchNorm2d(channels)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability ``p`` and rescale the rest by ``1 / (1 - p)``."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def _shortcut(cin: int, cout: int, stride: int, norm: str) -> nn.Sequential | None:
    """``downsample``: a strided 1x1 convolution + norm where the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), make_norm(norm, cout))


class _Residual(nn.Module, ABC):
    """Shared parts of both blocks: the shortcut, drop-path and the final ReLU."""

    downsample: nn.Sequential | None

    def __init__(self, drop: float) -> None:
        super().__init__()
        self.drop_path = drop

    @abstractmethod
    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch (convolutions and norms, before the sum)."""

    @abstractmethod
    def last_norm(self) -> nn.Module:
        """The norm closing the residual branch (zero-initialised with ``zero_init_residual``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + drop_path(self.branch(x), self.drop_path, self.training))


class BasicBlock(_Residual):
    """Two 3x3 convolutions (ResNet-18/34); the first one strides."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, norm: str = "bn", drop: float = 0.0) -> None:
        super().__init__(drop)
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = make_norm(norm, planes)
        self.downsample = _shortcut(cin, planes, stride, norm)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(_Residual):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50/101)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, norm: str = "bn", drop: float = 0.0) -> None:
        super().__init__(drop)
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = make_norm(norm, planes * 4)
        self.downsample = _shortcut(cin, planes * 4, stride, norm)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))

    def last_norm(self) -> nn.Module:
        return self.bn3


class ResNet(nn.Module):
    """ResNet backbone with the ViT backbone API (``forward_features``, ``get_intermediate_layers``, ...).

    ``embed_dim`` is the width of the last stage. ``n_blocks`` counts the residual blocks of ``layer4`` (the
    outputs of width ``embed_dim``), which ``get_intermediate_layers`` selects from. ``patch_size`` is 1: any
    input size works; ``feature_stride`` (32 or 8) is the side in pixels of one output position.
    """

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kind, counts = LAYOUTS[cfg.depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        w = cfg.width
        self.embed_dim = self.num_features = cfg.embed_dim
        self.patch_size = 1
        self.num_register_tokens = 0
        self.feature_stride = 32 if cfg.stem == "imagenet" else 8
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.in_chans, w, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = _conv(cfg.in_chans, w, 3)
            self.maxpool = nn.Identity()
        self.bn1 = make_norm(cfg.norm, w)
        cin = w
        stages = []
        for s, n in enumerate(counts):
            planes = w * 2**s
            blocks = []
            for j in range(n):
                stride = 2 if s > 0 and j == 0 else 1
                blocks.append(block(cin, planes, stride, cfg.norm, cfg.drop_path_rate))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.n_blocks = counts[-1]
        self.fc: nn.Module = nn.Linear(cin, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    @property
    def stages(self) -> list[nn.Sequential]:
        """``layer1`` .. ``layer4``."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def init_weights(self) -> None:
        """He-normal (fan-out) convolutions, unit-gamma norms, optional zero gamma closing each residual branch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
        if self.cfg.zero_init_residual:
            for stage in self.stages:
                for blk in stage:
                    nn.init.zeros_(blk.last_norm().weight)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay by timm-style optimisers (none)."""
        return set()

    # ----------------------------------------------------------------- forwards
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> ReLU -> max pool (identity for the small stem)."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output ``(B, embed_dim, h, w)``."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    @staticmethod
    def _outputs(fmap: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        patches = fmap.flatten(2).transpose(1, 2)  # (B, h*w, D)
        pooled = patches.mean(dim=1)
        return {
            "x_norm_clstoken": pooled,
            "x_norm_regtokens": patches[:, :0],
            "x_norm_patchtokens": patches,
            "x_prenorm": torch.cat((pooled.unsqueeze(1), patches), dim=1),
            "masks": masks,
        }

    def _features(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        if masks is not None and bool(masks.any()):
            raise ValueError("ResNet backbones take no token masks (iBOT): set loss.ibot_weight = 0")
        return self._outputs(self.feature_map(x), masks)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """The ViT feature dict: pooled feature as ``x_norm_clstoken``, flattened last map as patch tokens."""
        return self._features(x, masks)

    def forward_features_list(
        self, xs: list[torch.Tensor], masks_list: list[torch.Tensor | None] | None = None
    ) -> list[dict[str, torch.Tensor | None]]:
        """Multi-crop forward: one pass per crop group (batch statistics are per group, as DINO's ResNets)."""
        masks_list = [None] * len(xs) if masks_list is None else masks_list
        if len(masks_list) != len(xs):
            raise ValueError(f"got {len(xs)} crop groups but {len(masks_list)} masks")
        return [self._features(x, m) for x, m in zip(xs, masks_list)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` through ``fc``, or the pooled feature ``(B, embed_dim)`` without one."""
        return self.fc(self.feature_map(x).mean(dim=(2, 3)))

    def get_intermediate_layers(self, x: torch.Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True) -> tuple:
        """Outputs of the last ``n`` residual blocks of ``layer4`` (or of those indices), like the ViT API.

        Patch tokens are ``(B, h*w, D)`` (``(B, D, h, w)`` with ``reshape``), the "class token" is their mean.
        ``norm`` is accepted for API compatibility; a ResNet has no final norm.
        """
        del norm
        wanted = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= self.n_blocks:
            raise ValueError(f"n={n!r} selects blocks outside 0..{self.n_blocks - 1} of layer4")
        x = self.stem(x)
        for stage in self.stages[:-1]:
            x = stage(x)
        maps = []
        for i, blk in enumerate(self.layer4):
            x = blk(x)
            if i in wanted:
                maps.append(x)
        cls = [m.mean(dim=(2, 3)) for m in maps]
        patches = [m.contiguous() if reshape else m.flatten(2).transpose(1, 2) for m in maps]
        if return_class_token:
            return tuple(zip(patches, cls))
        return tuple(patches)
