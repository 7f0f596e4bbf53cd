"""Linear probe on frozen features, with model selection that never sees the reported split.

1. The TRAIN split is divided (stratified by class, seeded) into a fit part and a hold-out part.
2. One linear head per (feature set, learning rate) is trained on the fit part, all heads in parallel on the same
   feature batches (SGD with momentum, cosine schedule to 0, weight decay 0 by default).
3. The head with the best hold-out top-1 is chosen (ties: earlier in the grid).
4. The chosen configuration is retrained on the whole train split (``refit``) or kept.
5. Only then is the reported split loaded (``load_test`` is called exactly once) and evaluated once.

``select_linear_head`` takes only the train features, so steps 1-3 cannot read the reported split;
``run_linear_probe`` gets the reported split as a callable and calls it after the selection is final.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .config import LinearConfig
from .features import FeatureSet, resolve_device

logger = logging.getLogger(__name__)


def feature_sets(fs: FeatureSet) -> dict[str, slice]:
    """Named column ranges the heads can use, in grid order (last-1 CLS, +avgpool, last-n CLS, +avgpool)."""
    d, n = fs.embed_dim, fs.n_last_blocks
    if fs.mode == "cls":
        return {"last1_cls": slice(0, d)}
    if fs.mode == "avgpool":
        return {"avgpool": slice(0, d)}
    sets = {"last1_cls": slice((n - 1) * d, n * d)}
    if fs.mode == "lastn_avgpool":
        sets["last1_cls_avgpool"] = slice((n - 1) * d, (n + 1) * d)
    if n > 1:
        sets[f"last{n}_cls"] = slice(0, n * d)
        if fs.mode == "lastn_avgpool":
            sets[f"last{n}_cls_avgpool"] = slice(0, (n + 1) * d)
    return sets


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified ``(fit_indices, holdout_indices)``: about ``fraction`` of every class with >= 2 samples."""
    g = torch.Generator().manual_seed(seed)
    fit, hold = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_hold = min(max(1, round(fraction * len(idx))), len(idx) - 1) if len(idx) >= 2 else 0
        hold.append(idx[:n_hold])
        fit.append(idx[n_hold:])
    fit_idx, hold_idx = torch.cat(fit).sort().values, torch.cat(hold).sort().values
    if hold_idx.numel() == 0:
        raise ValueError("linear.holdout_fraction: the train split is too small to hold out any sample; add data")
    return fit_idx, hold_idx


def _init_head(in_dim: int, num_classes: int, g: torch.Generator) -> nn.Linear:
    head = nn.Linear(in_dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    return head


def train_heads(x: torch.Tensor, y: torch.Tensor, specs: list[tuple[slice, float]], num_classes: int,
                cfg: LinearConfig, device: torch.device, desc: str = "linear") -> list[nn.Linear]:
    """Train one head per ``(columns, base_lr)`` in parallel on the same shuffled batches of ``(x, y)``."""
    g = torch.Generator().manual_seed(cfg.seed)
    heads = [_init_head(sl.stop - sl.start, num_classes, g).to(device) for sl, _ in specs]
    scale = cfg.batch_size / 256 if cfg.scale_lr_by_batch else 1.0
    groups = [{"params": list(h.parameters()), "lr": lr * scale} for h, (_, lr) in zip(heads, specs)]
    opt = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    x, y = x.to(device), y.to(device)
    for _ in tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=None):
        perm = torch.randperm(len(y), generator=g).to(device)
        for start in range(0, len(y), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            loss = sum(F.cross_entropy(h(xb[:, sl]), yb) for h, (sl, _) in zip(heads, specs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(loss):
                raise ValueError("linear probe diverged (non-finite loss); lower linear.learning_rates")
            opt.step()
            sched.step()
    return heads


@torch.inference_mode()
def evaluate_heads(heads: list[nn.Linear], cols: list[slice], x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 4096) -> list[tuple[float, float]]:
    """(top-1, top-5) accuracy of each head on ``(x, y)``."""
    device = next(heads[0].parameters()).device
    correct = torch.zeros(len(heads), 2, dtype=torch.float64)
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device).view(-1, 1)
        for i, (h, sl) in enumerate(zip(heads, cols)):
            logits = h(xb[:, sl]).float()
            top = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :min(5, logits.shape[1])]
            correct[i, 0] += (top[:, :1] == yb).sum().item()
            correct[i, 1] += (top == yb).any(dim=1).sum().item()
    return [(float(a) / len(y), float(b) / len(y)) for a, b in correct]


@dataclass
class LinearSelection:
    """The outcome of model selection on the train hold-out (built without the reported split)."""

    feature_set: str
    "Chosen feature set."
    lr: float
    "Chosen base learning rate (before batch scaling)."
    holdout_top1: float
    "Hold-out top-1 of the chosen head."
    grid: list[dict]
    "Every (feature_set, lr, holdout_top1, holdout_top5) tried."
    n_fit: int
    n_holdout: int
    num_classes: int
    head: nn.Linear = field(repr=False)
    "The chosen head as trained on the fit part."


def _num_classes(train: FeatureSet) -> int:
    return len(train.classes) if train.classes else int(train.labels.max()) + 1


def select_linear_head(train: FeatureSet, cfg: LinearConfig) -> LinearSelection:
    """Train the grid on the fit part of ``train`` and choose on its hold-out part (train data only)."""
    sets = feature_sets(train)
    if cfg.feature_sets:
        unknown = sorted(set(cfg.feature_sets) - set(sets))
        if unknown:
            raise ValueError(f"linear.feature_sets: {unknown} not available for {train.mode!r} features "
                             f"(available: {list(sets)})")
        sets = {k: v for k, v in sets.items() if k in cfg.feature_sets}
    device = resolve_device(cfg.device)
    num_classes = _num_classes(train)
    fit_idx, hold_idx = holdout_split(train.labels, cfg.holdout_fraction, cfg.seed)
    grid = [(name, lr) for name in sets for lr in cfg.learning_rates]
    specs = [(sets[name], lr) for name, lr in grid]
    logger.info("linear probe: %d heads (%d feature sets x %d lrs), fit %d, hold-out %d", len(specs), len(sets),
                len(cfg.learning_rates), len(fit_idx), len(hold_idx))
    heads = train_heads(train.features[fit_idx], train.labels[fit_idx], specs, num_classes, cfg, device,
                        desc="linear grid")
    scores = evaluate_heads(heads, [sl for sl, _ in specs], train.features[hold_idx], train.labels[hold_idx])
    best = max(range(len(grid)), key=lambda i: (scores[i][0], -i))
    rows = [{"feature_set": n, "lr": lr, "holdout_top1": s[0], "holdout_top5": s[1]}
            for (n, lr), s in zip(grid, scores)]
    name, lr = grid[best]
    logger.info("linear probe: chose %s lr=%g (hold-out top-1 %.2f%%)", name, lr, 100 * scores[best][0])
    return LinearSelection(feature_set=name, lr=lr, holdout_top1=scores[best][0], grid=rows, n_fit=len(fit_idx),
                           n_holdout=len(hold_idx), num_classes=num_classes, head=heads[best])


@dataclass
class LinearResult:
    """Selection on the train hold-out and the single evaluation on the reported split."""

    selection: LinearSelection
    test_top1: float
    test_top5: float
    n_train: int
    n_test: int
    refit: bool

    def to_dict(self) -> dict:
        s = self.selection
        return {
            "feature_set": s.feature_set, "lr": s.lr, "test_top1": self.test_top1, "test_top5": self.test_top5,
            "n_train": self.n_train, "n_test": self.n_test, "num_classes": s.num_classes, "refit": self.refit,
            "selection": {"holdout_top1": s.holdout_top1, "n_fit": s.n_fit, "n_holdout": s.n_holdout,
                          "grid": s.grid},
        }


def run_linear_probe(train: FeatureSet, load_test: Callable[[], FeatureSet], cfg: LinearConfig) -> LinearResult:
    """Select on the train hold-out, optionally refit on all of train, then load and evaluate the test split once."""
    selection = select_linear_head(train, cfg)
    cols = feature_sets(train)[selection.feature_set]
    head = selection.head
    if cfg.refit:
        device = resolve_device(cfg.device)
        head = train_heads(train.features, train.labels, [(cols, selection.lr)], selection.num_classes, cfg,
                           device, desc="linear refit")[0]
    test = load_test()  # the reported split is first touched here, after the selection is final
    if (test.mode, test.embed_dim, test.n_last_blocks) != (train.mode, train.embed_dim, train.n_last_blocks):
        raise ValueError("test features have a different layout than the train features")
    top1, top5 = evaluate_heads([head], [cols], test.features, test.labels)[0]
    logger.info("linear probe: test top-1 %.2f%%, top-5 %.2f%%", 100 * top1, 100 * top5)
    return LinearResult(selection=selection, test_top1=top1, test_top5=top5, n_train=len(train), n_test=len(test),
                        refit=cfg.refit)
