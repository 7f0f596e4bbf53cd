"""Global batch normalisation: batch statistics over every rank's batch, on any device and backend.

SimCLR (Chen et al. 2020, section 2.2) aggregates BN mean and variance over all devices during training, so a
positive pair cannot share local statistics that leak information. ``torch.nn.SyncBatchNorm`` does this on GPUs
only (it refuses CPU tensors under a process group), so :class:`GlobalBatchNorm` computes the statistics with
differentiable all-gathers (``pretrain.utils.dist.all_gather_with_grad``) on gloo and NCCL alike. With one
process it is ordinary batch norm (same formula, so 1 and N processes agree up to summation order). Keys and
buffers are those of ``nn.BatchNorm*d`` (checkpoints and exports are unchanged); eval mode uses running stats.
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.utils.dist import all_gather_with_grad

__all__ = ["GlobalBatchNorm", "convert_global_bn"]


def _global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` (1-D) over ranks, differentiably."""
    return all_gather_with_grad(x.unsqueeze(0)).sum(0)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the channel dim 1 of (N, C) or (N, C, ...) inputs, statistics gathered across ranks."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch = self.training or self.running_mean is None
        if not use_batch:
            return nn.functional.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # fp32 at least (bf16 activations)
        dims = [0, *range(2, x.dim())]
        count = _global_sum(torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device))
        mean = _global_sum(x.sum(dims)) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centered = x - mean.view(shape)
        var = _global_sum(centered.square().sum(dims)) / count  # biased, for normalisation (two passes: stable)
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * count / (count - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(input.dtype)


def convert_global_bn(module: nn.Module) -> nn.Module:
    """Replace every batch norm in ``module`` (BatchNorm1d/2d/3d, SyncBatchNorm) by a :class:`GlobalBatchNorm`
    with the same settings, parameters and buffers; returns the (possibly new) module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=None, dtype=None)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_global_bn(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
