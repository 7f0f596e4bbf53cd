"""LARS (You et al. 2017) as SimCLR uses it (Chen et al. 2020, the released ``LARSOptimizer``).

Per parameter ``w`` with gradient ``g``, lr ``lr``, weight decay ``wd``, momentum ``m`` and trust coefficient
``eta`` (0.001)::

    g   <- g + wd * w                                  if the group decays (``weight_decay`` > 0)
    lr' <- lr * eta * ||w|| / ||g||                    if the group adapts (``lars``) and both norms are > 0
    lr' <- lr                                          otherwise (trust ratio 1)
    v   <- m * v + lr' * g
    w   <- w - v

SimCLR excludes biases and batch-norm parameters from both weight decay and the adaptation; the method marks
those groups with ``lars=False`` and ``wd_multiplier=0``. Norms are of the whole parameter: with FSDP2 the
parameters are DTensor shards, whose norms are reduced over the mesh (the update itself stays shard-local).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["LARS", "lars_param_groups"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of the whole (possibly sharded) tensor, as a plain fp32 scalar tensor."""
    n = torch.linalg.vector_norm(t)
    full = getattr(n, "full_tensor", None)
    return (full() if callable(full) else n).float()


class LARS(torch.optim.Optimizer):
    """SGD with momentum, weight decay and the layer-wise trust ratio (see the module docstring).

    Group options: ``lr``, ``weight_decay``, ``momentum`` (0.9), ``trust_coefficient`` (0.001) and ``lars``
    (True: adapt this group's lr by the trust ratio; False: plain momentum SGD, SimCLR's biases and norms).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:  # fmt: skip
        if lr < 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0 or trust_coefficient <= 0:
            raise ValueError(f"LARS needs lr, weight_decay >= 0, momentum in [0, 1), trust_coefficient > 0; got "
                             f"{lr}, {weight_decay}, {momentum}, {trust_coefficient}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "trust_coefficient": trust_coefficient, "lars": True}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, m = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if group["lars"]:
                    w_norm, g_norm = _norm(p), _norm(grad)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / g_norm.clamp_min(1e-30),
                                        torch.ones_like(w_norm))
                    scaled = ratio * lr
                else:
                    scaled = torch.tensor(float(lr), device=_local(p).device)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf, g = _local(state["momentum_buffer"]), _local(grad)
                buf.mul_(m).add_(g * scaled.to(g.dtype))
                _local(p).sub_(buf)
        return loss


def lars_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups for :class:`LARS` over ``model``'s trainable parameters: weights (decayed and adapted) and the
    1-D ones - biases and batch-norm scales and shifts in a ResNet + MLP - with ``lars=False`` and
    ``wd_multiplier=0`` (SimCLR's ``exclude_from_weight_decay=['batch_normalization', 'bias']``, which its LARS
    also applies to the adaptation). Groups carry ``lr_multiplier`` / ``wd_multiplier`` for
    ``pretrain.optim.apply_schedules`` and ``n_params``."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for lars in (True, False):
        ps = [p for p in params if (p.ndim > 1) == lars]
        if ps:
            groups.append({"params": ps, "lars": lars, "wd_multiplier": float(lars), "lr_multiplier": 1.0,
                           "n_params": sum(p.numel() for p in ps)})
    if not groups:
        raise ValueError("the model has no trainable parameter")
    return groups
