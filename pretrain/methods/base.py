"""The method protocol: what a training method implements so that one :class:`pretrain.train.Trainer` runs it.

A method owns its modules and its objective; the Trainer owns everything else (process group, the loop and its
phases, FSDP2 sharding, the optimizer step, DCP checkpoints and resharding resume, the non-finite guard, metrics
and the call to export). Per step the Trainer does::

    values = schedules.at(step)                      # lr, wd, momentum, teacher temperature
    method.train_mode()
    loss, out = method.compute_losses(batch, values)  # out["losses"]: detached parts incl. "total"
    loss.backward(); clip_grad_per_module(method.clip_modules()); guard; optimizer.step()
    method.after_step(values)                        # EMAs (declared in parts()), then queues, banks, ...

A new method subclasses :class:`Method`, sets ``name`` (and ``config_class`` when it has settings of its own: a
subclass of :class:`pretrain.config.TrainConfig`), implements the abstract hooks and registers itself with
:func:`register_method`. A recipe selects it with ``method = "<name>"``. Queues and memory banks are buffers of
the method's modules (so they are checkpointed with the model state); momentum encoders are ``"ema"`` parts.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import nn

from pretrain.checkpoint import ModelState, OptimizerState
from pretrain.config import TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.data.masking import MaskingConfig
from pretrain.optim import ScheduleValues, build_optimizer
from pretrain.parallel.ema import ema_update_

__all__ = ["METHODS", "LossOutput", "Method", "Part", "Views", "get_method", "register_method", "vit_decay_groups"]

LossOutput = tuple[torch.Tensor, dict[str, Any]]
"""``(loss, out)``: the loss to back-propagate and ``out["losses"]`` (detached parts, ``"total"`` included) plus
optional ``out["extras"]`` for :meth:`Method.monitor`."""

PartKind = Literal["trained", "ema", "frozen"]


@dataclasses.dataclass(frozen=True)
class Part:
    """One module of a method that the Trainer shards with FSDP2 as its own unit tree."""

    name: str
    """Name in logs and errors."""
    module: nn.Module
    """A submodule of the method's ``arch``."""
    kind: PartKind
    """'trained' (gradients, the optimizer's parameters, activation checkpointing as ``train`` says), 'ema' (an
    exponential moving average of the trained part ``ema_of``, sharded the same way so the update is shard-local)
    or 'frozen' (no gradients, eval mode)."""
    ema_of: str | None = None
    """For 'ema' parts: the name of the trained part it averages."""
    forward_methods: tuple[str, ...] = ()
    """Backbone methods called directly (e.g. ``forward_features``), registered with FSDP."""

    def __post_init__(self) -> None:
        if self.kind not in ("trained", "ema", "frozen"):
            raise ValueError(f"part {self.name}: kind must be 'trained', 'ema' or 'frozen', got {self.kind!r}")
        if (self.kind == "ema") != (self.ema_of is not None):
            raise ValueError(f"part {self.name}: ema_of names the averaged part of an 'ema' part, and only of one")


@dataclasses.dataclass(frozen=True)
class Views:
    """What the data loader makes of every image for a method, in one phase."""

    crops: MultiCropConfig
    """Global and local crops (sizes, scales, photometric augmentations)."""
    patch_size: int
    """Patch size of the masks' grid."""
    masking: MaskingConfig | None = None
    """Block masking of the global crops; None for no masks."""



class Method(ABC):
    """A training method (see the module docstring). Instances are made by the Trainer: ``cls(cfg)``."""

    name: ClassVar[str]
    """The recipe's ``method`` value."""
    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    """The method's config: :class:`TrainConfig` or a subclass with the method's sections."""

    def __init__(self, cfg: TrainConfig) -> None:
        if not isinstance(cfg, self.config_class):
            raise ValueError(f"method {self.name!r} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg
        self._arch: nn.Module | None = None

    # ------------------------------------------------------------------ modules
    @abstractmethod
    def build(self) -> nn.Module:
        """Every module of the method in one container (on the CPU, unsharded; the seed is already set)."""

    @abstractmethod
    def parts(self) -> list[Part]:
        """The modules to shard, in order: what is trained, what is an EMA of what, what is frozen."""

    def setup(self, device: torch.device) -> nn.Module:
        """Build the modules onto ``device``; the Trainer calls this once, before sharding."""
        self._arch = self.build().to(device)
        for part in self.parts():
            if part.kind != "trained":
                part.module.requires_grad_(False)
        return self._arch

    @property
    def arch(self) -> nn.Module:
        """The container returned by :meth:`build`."""
        if self._arch is None:
            raise RuntimeError(f"method {self.name!r}: setup() has not run yet")
        return self._arch

    def train_mode(self) -> None:
        """Training mode for trained parts, eval mode for EMAs and frozen parts (called before every step)."""
        self.arch.train()
        for part in self.parts():
            if part.kind != "trained":
                part.module.eval()

    # ------------------------------------------------------------------ data and optimisation
    @abstractmethod
    def views(self, crops: MultiCropConfig) -> Views:
        """The views of a phase whose crops are ``crops``."""

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (``params`` plus multipliers read by ``pretrain.optim.apply_schedules``)."""

    @abstractmethod
    def clip_modules(self) -> dict[str, nn.Module]:
        """Submodules whose gradients are clipped (and whose norms are logged) separately."""

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer over ``groups``: ``train.optimizer`` ('adamw' with ``optim``'s betas/eps, or 'sgd')."""
        if self.cfg.train.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=0.0)
        return build_optimizer(groups, self.cfg.optim)

    def adjust_lr(self, optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
        """After the schedules set every group's lr for this step: a method's own changes (e.g. a backbone frozen,
        then warmed up, while continuing from released weights). Default: none."""
        return None

    # ------------------------------------------------------------------ one step
    @abstractmethod
    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        """The loss of a collated batch (already on the device) at this step's schedule ``values``."""

    def after_step(self, values: ScheduleValues) -> None:
        """After the optimizer step: every 'ema' part moves towards its trained part by ``values.momentum``.

        Methods with queues or memory banks extend this (and call ``super().after_step(values)``).
        """
        parts = {p.name: p for p in self.parts()}
        with torch.no_grad():
            for part in parts.values():
                if part.kind == "ema":
                    ema_update_(part.module.parameters(), parts[part.ema_of].module.parameters(), values.momentum)

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Extra metrics from ``compute_losses``'s output, every ``train.monitor_every`` steps (collapse monitors)."""
        return {}

    def flops_per_sample(self, batch: dict[str, Any]) -> float | None:
        """Training FLOPs (forward + backward of every network) per image of ``batch``, for MFU; None: unknown."""
        return None

    # ------------------------------------------------------------------ state and export
    def checkpoint_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """DCP state of the method: ``model`` (modules and their buffers: centers, queues, banks) and ``optim``.

        The Trainer adds ``rng`` and ``data``. Default: the whole ``arch`` and the optimizer keyed by its names.
        """
        return {"model": ModelState(self.arch), "optim": OptimizerState(self.arch, optimizer)}

    def export(self, out: Path, *, is_main: bool) -> None:  # noqa: B027 - optional hook
        """Write the deliverables under ``out`` at the end of the run; every rank calls it (gathers are collective),
        only ``is_main`` writes."""

    def summary(self) -> str:
        """One line about the built modules for the run's log (rank 0); empty for none."""
        return ""


METHODS: dict[str, type[Method]] = {}
"""Registered methods by name."""

MethodT = TypeVar("MethodT", bound=type[Method])


def register_method(cls: MethodT) -> MethodT:
    """Class decorator: register ``cls`` under ``cls.name`` (a re-import of the same class replaces it)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string")
    old = METHODS.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"method {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    METHODS[name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The registered method ``name`` (importing ``pretrain.methods.<name>`` first if it is not registered yet);
    ValueError naming the known ones otherwise."""
    if name not in METHODS and name.isidentifier():
        try:  # a method module not imported yet: pretrain/methods/<name>.py registers itself on import
            importlib.import_module(f"pretrain.methods.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pretrain.methods.{name}":
                raise
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method {name!r} is unknown; known: {', '.join(sorted(METHODS))}") from None


VIT_NO_DECAY_TOKENS = ("pos_embed", "cls_token", "register_tokens", "mask_token")


def vit_decay_groups(module: nn.Module, no_decay_names: tuple[str, ...] = VIT_NO_DECAY_TOKENS) -> list[dict[str, Any]]:
    """Two optimizer groups of ``module``'s trainable parameters: weight decay on matrices; none on biases, norms,
    LayerScale and the parameters whose last name is in ``no_decay_names`` (positions and tokens)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name.rsplit(".", 1)[-1] in no_decay_names
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": False},
            {"params": no_decay, "lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False}]
