"""DINO / iBOT projection head: MLP -> bottleneck -> L2 normalise -> weight-normalised prototypes.

State-dict layout matches the official DINOv2 ``DINOHead`` (legacy ``torch.nn.utils.weight_norm`` names), so heads
load from and export to the reference checkpoints without renaming::

    mlp.0.weight/bias   (hidden, in)        mlp.2.weight/bias (hidden, hidden)   mlp.4.weight/bias (bneck, hidden)
    last_layer.weight_g (K, 1)              last_layer.weight_v (K, bneck)

(with ``nlayers`` != 3 the MLP indices are 0, 2, ..., 2 * (nlayers - 1); GELU sits at the odd indices).
The prototype layer is a small custom module with plain ``weight_g`` / ``weight_v`` parameters rather than the
deprecated hook-based ``weight_norm`` or the parametrization API (which renames keys); that also keeps it a plain
module for FSDP2. ``weight_g`` starts at 1 and is trainable, as in the reference.

Tied vs untied iBOT head is the meta-architecture's choice: :func:`build_heads` returns ``{"dino_head": ...}`` and,
when ``separate_ibot_head`` is set, an independent ``"ibot_head"``; with a shared head the caller feeds the masked
patch tokens through ``dino_head``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "HeadsConfig", "WeightNormLinear", "build_heads"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with ``weight = weight_g * weight_v / ||weight_v||`` (norm over each output row)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight_v`` ~ trunc_normal(0.02) (only its direction matters), ``weight_g`` = 1."""
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out_features, in_features) weight."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2 normalisation (fp32), then ``out_dim`` weight-normalised prototypes.

    Input (..., in_dim) -> output logits (..., out_dim). Linear layers of the MLP use trunc_normal(0.02) weights
    and zero biases.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=mlp_bias))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """trunc_normal(0.02) MLP weights, zero biases; prototypes as in :class:`WeightNormLinear`."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer.reset_parameters()

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """MLP then L2 normalisation (computed in fp32, eps 1e-12), returned in the MLP output dtype."""
        z = self.mlp(x)
        return F.normalize(z.float(), p=2, dim=-1, eps=1e-12).to(z.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.forward_bottleneck(x))


@dataclasses.dataclass(kw_only=True)
class HeadsConfig:
    """Projection heads of the DINOv2 objective (defaults: ViT-S/B recipe; L/g use 131072 / 384 / untied)."""

    out_dim: int = 65536
    """Number of DINO prototypes K."""
    hidden_dim: int = 2048
    """Hidden width of the head MLP."""
    bottleneck_dim: int = 256
    """Bottleneck width (L2-normalised before the prototypes)."""
    nlayers: int = 3
    """Linear layers in the MLP (including the bottleneck projection)."""
    separate_ibot_head: bool = False
    """Build an untied iBOT head; otherwise masked patch tokens go through the DINO head."""
    ibot_out_dim: int = 65536
    """Prototypes of the untied iBOT head (used only when separate_ibot_head)."""
    ibot_hidden_dim: int = 2048
    """Hidden width of the untied iBOT head."""
    ibot_bottleneck_dim: int = 256
    """Bottleneck of the untied iBOT head."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (int, "int") and (not isinstance(value, int) or value < 1):
                raise ValueError(f"heads.{f.name} must be a positive integer, got {value!r}")


def build_heads(cfg: HeadsConfig, in_dim: int) -> dict[str, DINOHead]:
    """``{"dino_head": DINOHead}`` plus ``"ibot_head"`` when ``cfg.separate_ibot_head`` (fresh, untied modules)."""
    heads = {
        "dino_head": DINOHead(in_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers),
    }
    if cfg.separate_ibot_head:
        heads["ibot_head"] = DINOHead(in_dim, cfg.ibot_out_dim, cfg.ibot_hidden_dim, cfg.ibot_bottleneck_dim,
                                      cfg.nlayers)
    return heads
