"""DINO softmax centering: teacher targets ``softmax((t - c) / temp)`` with an EMA center ``c``.

``c <- m * c + (1 - m) * mean(t)`` with momentum m = 0.9, where the mean runs over the *global* batch (sums and
counts all-reduced over the default process group when one is initialised). One instance per head output: the
DINO CLS center and the iBOT patch center (mean over masked patches) are separate modules.

Call order per step, as in DINOv2: ``probs = center.teacher_probs(logits, temp)`` then ``center.update(logits)``.
The step-t targets therefore use the center after batch t-1, exactly like the reference. The reference reduces
the batch mean with an asynchronous all-reduce and folds it in at the start of the next ``teacher_probs`` call;
``async_op=True`` does the same (overlap only, identical numbers), ``async_op=False`` (default) applies it at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pretrain.utils.dist import is_dist, world_size

__all__ = ["SoftmaxCenter"]


class SoftmaxCenter(nn.Module):
    """EMA center over the last dimension of teacher logits, kept in fp32 buffer ``center`` of shape (1, K)."""

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.out_dim = out_dim
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: tuple[torch.Tensor, object | None] | None = None

    @torch.no_grad()
    def teacher_probs(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        """``softmax((logits - center) / temp)`` over the last dim in fp32 (autocast off); no gradient.

        ``logits``: (..., K) teacher head outputs, any float dtype. Applies a pending asynchronous update first.
        """
        if logits.shape[-1] != self.out_dim:
            raise ValueError(f"logits last dim {logits.shape[-1]} != center size {self.out_dim}")
        if temp <= 0:
            raise ValueError(f"temp must be > 0, got {temp}")
        self.apply_pending()
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return torch.softmax((logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, n_samples: int | torch.Tensor | None = None, async_op: bool = False) -> None:
        """Fold the global batch mean of ``logits`` (rows = samples, (..., K) flattened) into the EMA center.

        ``n_samples``: number of valid leading rows on this rank (rows past it are padding and ignored); None =
        all rows. ``async_op``: launch the all-reduce now and apply it at the next ``teacher_probs`` /
        ``apply_pending`` call (the reference's overlap); ignored without a process group.
        """
        if logits.shape[-1] != self.out_dim:
            raise ValueError(f"logits last dim {logits.shape[-1]} != center size {self.out_dim}")
        self.apply_pending()
        rows = logits.detach().reshape(-1, self.out_dim)
        if n_samples is not None:
            if isinstance(n_samples, int) and not 0 <= n_samples <= rows.shape[0]:
                raise ValueError(f"n_samples must be in [0, {rows.shape[0]}], got {n_samples}")
            keep = torch.arange(rows.shape[0], device=rows.device) < torch.as_tensor(n_samples, device=rows.device)
            rows = rows * keep[:, None].to(rows.dtype)
            count = keep.sum().to(torch.float32)
        else:
            count = torch.tensor(float(rows.shape[0]), device=rows.device)
        with torch.autocast(device_type=rows.device.type, enabled=False):
            # One buffer carries the sums and the count, so a single all-reduce serves both.
            payload = torch.cat([rows.float().sum(dim=0), count.reshape(1)])
        handle = None
        if is_dist() and world_size() > 1:
            handle = dist.all_reduce(payload, op=dist.ReduceOp.SUM, async_op=async_op)
        self._pending = (payload, handle)
        if not async_op:
            self.apply_pending()

    @torch.no_grad()
    def apply_pending(self) -> None:
        """Wait for and apply an update started with ``async_op=True`` (no-op when none is pending)."""
        if self._pending is None:
            return
        payload, handle = self._pending
        self._pending = None
        if handle is not None:
            handle.wait()
        total, count = payload[:-1], payload[-1]
        batch_center = (total / count.clamp(min=1.0)).reshape(1, -1).to(self.center.dtype)
        # c <- m c + (1 - m) mean; an empty global batch (no masked patch anywhere) leaves c unchanged. Written
        # with a tensor weight so that no host sync is needed.
        weight = (1.0 - self.momentum) * (count > 0).to(self.center.dtype)
        self.center.add_(weight * (batch_center - self.center))
