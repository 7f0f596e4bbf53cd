"""Weighted k-NN classification (DINO protocol) on L2-normalised features.

For each test query the train samples are ranked by cosine similarity (ties: lower train index first); each of
the top ``k`` (``k`` capped at the train-set size) votes for its class with weight ``exp(sim / T)``. Class
scores are normalised to sum to 1; classes are ranked by score (ties: lower class index first) for top-1/top-5.
Queries are processed in chunks so memory stays at ``chunk_size x n_train`` similarities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import KnnConfig
from .features import FeatureSet, resolve_device

logger = logging.getLogger(__name__)


def _canonical_order(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending, ties by index ascending."""
    idx, perm = idx.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, perm)


def topk_stable(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row ranked by value descending, ties broken by lower column index (deterministic)."""
    vals, idx = _canonical_order(*torch.topk(sim, k, dim=1))
    thresh = vals[:, -1:]
    n_tied = (sim >= thresh).sum(dim=1)
    rows = (n_tied > k).nonzero().flatten()  # rows where topk may have picked arbitrary members of a tie
    if rows.numel():
        s = sim[rows]
        t = thresh[rows]
        greater = s > t
        equal = s == t
        need = k - greater.sum(dim=1, keepdim=True)
        chosen = greater | (equal & (equal.cumsum(dim=1) <= need))
        r_idx = chosen.nonzero()[:, 1].view(len(rows), k)  # ascending column order
        vals[rows], idx[rows] = _canonical_order(s.gather(1, r_idx), r_idx)
    return vals, idx


def _chunk_neighbors(train_n: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = F.normalize(queries.to(train_n.device).float(), dim=1)
    return topk_stable(q @ train_n.T, k)


def knn_neighbors(train: torch.Tensor, queries: torch.Tensor, k: int,
                  chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices ``(Q, min(k, N))`` of the nearest train rows of each query."""
    train_n = F.normalize(train.float(), dim=1)
    k = min(k, train.shape[0])
    out = [_chunk_neighbors(train_n, queries[s:s + chunk_size], k) for s in range(0, queries.shape[0], chunk_size)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def vote(sims: torch.Tensor, neighbor_labels: torch.Tensor, k: int, num_classes: int,
         temperature: float) -> torch.Tensor:
    """Class scores ``(Q, C)`` (float64, rows sum to 1) from the first ``k`` ranked neighbours."""
    s = sims[:, :k].double()
    w = torch.exp((s - s[:, :1]) / temperature)  # proportional to exp(sim / T); shifted for range
    scores = torch.zeros(s.shape[0], num_classes, dtype=torch.float64, device=s.device)
    scores.scatter_add_(1, neighbor_labels[:, :k], w)
    return scores / scores.sum(dim=1, keepdim=True)


def rank_classes(scores: torch.Tensor, top: int) -> torch.Tensor:
    """The ``top`` best classes of each row (score descending, ties by lower class index)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]


@dataclass
class KnnResult:
    """Accuracy per requested ``k``."""

    ks: list[int]
    "Requested k values."
    k_effective: list[int]
    "k actually used (capped at n_train)."
    top1: list[float]
    "Top-1 accuracy (fraction) per k."
    top5: list[float]
    "Top-5 accuracy (fraction) per k."
    n_train: int
    n_test: int
    num_classes: int
    temperature: float

    def to_dict(self) -> dict:
        return {
            "n_train": self.n_train, "n_test": self.n_test, "num_classes": self.num_classes,
            "temperature": self.temperature,
            "results": [{"k": k, "k_effective": ke, "top1": t1, "top5": t5}
                        for k, ke, t1, t5 in zip(self.ks, self.k_effective, self.top1, self.top5)],
        }


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                cfg: KnnConfig, num_classes: int, device: str = "auto") -> dict[int, torch.Tensor]:
    """Top-5 (or top-C) class predictions ``(Q, min(5, C))`` per requested k."""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one train and one test sample")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} columns, test {test_features.shape[1]}")
    dev = resolve_device(device)
    train = F.normalize(train_features.to(dev).float(), dim=1)
    labels = train_labels.to(dev)
    max_k = min(max(cfg.ks), train.shape[0])
    top = min(5, num_classes)
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in cfg.ks}
    for start in range(0, test_features.shape[0], cfg.chunk_size):
        sims, idx = _chunk_neighbors(train, test_features[start:start + cfg.chunk_size], max_k)
        nl = labels[idx]
        for k in cfg.ks:
            scores = vote(sims, nl, min(k, max_k), num_classes, cfg.temperature)
            preds[k].append(rank_classes(scores, top).cpu())
    return {k: torch.cat(v) for k, v in preds.items()}


def knn_evaluate(train: FeatureSet, test: FeatureSet, cfg: KnnConfig, device: str = "auto") -> KnnResult:
    """k-NN top-1 / top-5 of ``test`` against ``train`` using the last-block CLS columns."""
    cols = train.cls_columns()
    if test.cls_columns() != cols:
        raise ValueError("train and test features have different layouts")
    num_classes = len(train.classes) if train.classes else int(max(train.labels.max(), test.labels.max())) + 1
    preds = knn_predict(train.features[:, cols], train.labels, test.features[:, cols], cfg, num_classes, device)
    y = test.labels.view(-1, 1)
    top1, top5 = [], []
    for k in cfg.ks:
        p = preds[k]
        top1.append(int((p[:, :1] == y).any(dim=1).sum()) / len(y))
        top5.append(int((p == y).any(dim=1).sum()) / len(y))
    n = len(train)
    result = KnnResult(ks=list(cfg.ks), k_effective=[min(k, n) for k in cfg.ks], top1=top1, top5=top5,
                       n_train=n, n_test=len(test), num_classes=num_classes, temperature=cfg.temperature)
    for k, t1, t5 in zip(result.ks, top1, top5):
        logger.info("k-NN k=%d: top-1 %.2f%%, top-5 %.2f%%", k, 100 * t1, 100 * t5)
    return result
