"""The configuration every training method shares: run name and seed, the method, data, schedules, optimizer,
loop and phases.

A method with settings of its own subclasses :class:`TrainConfig` and adds its sections (DINOv2: ``backbone``,
``heads``, ``loss``; distillation: ``teacher``, ``students``, ``loss``, ``feature_weight``), so one recipe keeps
one flat layout and no method repeats the shared fields. ``load_config(TrainConfig, recipe)`` reads the recipe's
``method`` field (default ``"dinov2"``) and builds that method's config class (see
:func:`pretrain.utils.config.build`), so old recipes without the field still load as DINOv2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pretrain.data.augment import MultiCropConfig
from pretrain.data.masking import MaskingConfig
from pretrain.data.wds import WdsConfig
from pretrain.optim import OptimConfig, ScheduleConfig

__all__ = ["DEFAULT_METHOD", "DataConfig", "LoopConfig", "MaskedDataConfig", "PhaseConfig", "TrainConfig"]

DEFAULT_METHOD = "dinov2"


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Training data: WebDataset shards and multi-crop augmentation."""

    shards: WdsConfig
    """Shard sets, batch size per rank, loader workers, shuffle buffer, seed."""
    crops: MultiCropConfig = dataclasses.field(default_factory=MultiCropConfig)
    """Multi-crop augmentation (sizes, scales, photometric augmentations)."""


@dataclasses.dataclass(kw_only=True)
class MaskedDataConfig(DataConfig):
    """Training data with block masking of the global crops (iBOT)."""

    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    """Block masking of the global crops (iBOT)."""


@dataclasses.dataclass(kw_only=True)
class PhaseConfig:
    """A phase after the main one, e.g. DINOv2's last 10k iterations at 518 px with compressed schedules."""

    name: str = "highres"
    """Name used in logs and metrics."""
    iters: int
    """Length of the phase in iterations."""
    global_size: int
    """Global crop size in the phase (518 in the paper)."""
    local_size: int | None = None
    """Local crop size (None: unchanged)."""
    batch_size: int | None = None
    """Batch size per rank (None: unchanged)."""
    base_lr: float | None = None
    """Base lr of the phase (the paper lowers it); None keeps the main one."""
    freeze_last_layer_iters: int = 0
    """Iterations at the start of the phase with a frozen prototype layer."""
    global_sizes: list[int] | None = None
    """Mixed resolutions (DINOv3's high-resolution adaptation): each batch draws its global crop size from these
    (None: always ``global_size``)."""
    local_sizes: list[int] | None = None
    """Each batch draws its local crop size from these (None: always ``local_size``)."""
    gram_upscale: int = 1
    """DINOv2 with Gram anchoring: the Gram teacher sees the global crops rendered at this multiple of their size
    (its patch features are then resized to the student's grid), as DINOv3's high-resolution adaptation."""

    def __post_init__(self) -> None:
        if self.iters < 2:
            raise ValueError(f"phases.iters must be >= 2, got {self.iters}")
        if self.global_size < 1:
            raise ValueError(f"phases.global_size must be >= 1, got {self.global_size}")
        for name in ("global_sizes", "local_sizes"):
            sizes = getattr(self, name)
            if sizes is not None and (not sizes or any(v < 1 for v in sizes)):
                raise ValueError(f"phases.{name} must be a non-empty list of sizes >= 1, got {sizes}")
        if self.gram_upscale < 1:
            raise ValueError(f"phases.gram_upscale must be >= 1, got {self.gram_upscale}")
        if self.base_lr is not None and self.base_lr < 0:
            raise ValueError(f"phases.base_lr must be >= 0, got {self.base_lr}")


@dataclasses.dataclass(kw_only=True)
class LoopConfig:
    """The training loop's own settings."""

    precision: str = "bf16"
    """'bf16' (autocast, and bf16 FSDP params with fp32 reduce) or 'fp32'."""
    optimizer: str = "adamw"
    """'adamw' (DINOv2) or 'sgd' (plain SGD, used by parity tests)."""
    compile: bool = False
    """torch.compile each transformer block."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward (trained modules only)."""
    checkpoint_every: int = 1000
    """Save a DCP checkpoint every N iterations (and at every phase end)."""
    keep_last: int = 3
    """Checkpoints to keep."""
    log_every: int = 10
    """Metrics to metrics.jsonl / TensorBoard / the progress line every N iterations."""
    monitor_every: int = 100
    """Collapse monitors every N iterations."""
    max_bad_steps: int = 5
    """Consecutive non-finite steps (skipped) before the run stops with an error naming the ranks."""
    stop_at: int | None = None
    """Stop (after checkpointing) once this global iteration is reached; None runs every phase to the end."""
    tensorboard: bool = True
    """Also write TensorBoard event files (runs/<name>/tb)."""

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"train.precision must be 'bf16' or 'fp32', got {self.precision!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        for name in ("checkpoint_every", "keep_last", "log_every", "monitor_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """A whole training run (one TOML recipe): the shared sections; a method's config class adds its own."""

    name: str = "run"
    """Run name (logs)."""
    seed: int = 0
    """Seed of model init (data seeds are in data.shards.seed)."""
    method: str = DEFAULT_METHOD
    """The training method, a name in ``pretrain.methods.METHODS`` ('dinov2', 'distill', ...)."""
    data: DataConfig
    """Shards and crops (and whatever else the method's data section holds)."""
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    """Main-phase schedules (lr, wd, momentum, teacher temperature, last-layer freeze)."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer, parameter groups, clipping."""
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    """Loop settings (precision, checkpoints, logging)."""
    phases: list[PhaseConfig] = dataclasses.field(default_factory=list)
    """Phases after the main one (e.g. the high-resolution phase)."""

    def __post_init__(self) -> None:
        from pretrain.methods import get_method

        expected = get_method(self.method).config_class  # raises naming 'method' when unknown
        if not isinstance(self, expected):
            raise ValueError(f"method: {self.method!r} is configured by {expected.__name__}, not "
                             f"{type(self).__name__}; set method to the one this recipe is for")

    @classmethod
    def resolve_config_class(cls, data: Mapping[str, Any]) -> type[TrainConfig]:
        """The class to build from recipe ``data``: the base class picks the ``method``'s config class."""
        if cls is not TrainConfig:
            return cls
        from pretrain.methods import get_method

        name = data.get("method", DEFAULT_METHOD)
        if not isinstance(name, str):
            raise ValueError(f"method: expected a method name, got {name!r}")
        return get_method(name).config_class
