"""``python -m pretrain distill RECIPE.toml --out RUN_DIR [--set a.b=v ...]``: DINOv2 distillation of a frozen
teacher into one or more students, each exported as the EMA of its weights.

The method lives in :mod:`pretrain.methods.distill` and runs in the one :class:`pretrain.train.Trainer`; this
command is ``python -m pretrain train`` with the recipe read as a :class:`DistillConfig` (``method = "distill"``
is implied).
"""

from __future__ import annotations

from pretrain.config import DataConfig
from pretrain.methods.distill import DistillConfig, DistillMethod
from pretrain.train import Trainer, cli

__all__ = ["DistillConfig", "DistillDataConfig", "DistillMethod", "DistillTrainer", "main"]

DistillDataConfig = DataConfig
"""Distillation data: shards and crops, no masking (students see every patch). Former name, kept for imports."""

DistillTrainer = Trainer
"""Former name of the distillation trainer: the one :class:`Trainer` runs a :class:`DistillConfig`."""


def main(argv: list[str] | None = None) -> int:
    """Distil a frozen teacher into students: ``distill RECIPE.toml --out RUN_DIR [--set section.field=value ...]``."""
    return cli(argv, DistillConfig, prog="python -m pretrain distill", description=main.__doc__,
               example="teacher.weights=runs/g14/export/teacher.pth")
