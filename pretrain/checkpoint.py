"""Training checkpoints with torch.distributed.checkpoint (DCP): sharded, atomic, resumable on another world size.

Layout under the checkpoint directory (``runs/<name>/checkpoints`` by convention)::

    step-120/            a committed checkpoint
      .metadata          DCP index (written last by DCP)
      __0_0.distcp ...   one data file per writing rank
      rank-00000.pt ...  rank-local state (RNG, data position) of each rank
      meta.json          step, world size, state keys, the caller's ``extra`` JSON
      .complete          commit marker
    .tmp-step-140/       a save in progress (or one that crashed): never read

A save goes to ``.tmp-step-N`` and is committed by writing ``.complete`` and renaming the directory, so a crash
mid-save leaves the previous checkpoint as the latest valid one. Model and optimizer state go through
``get_state_dict``-style wrappers (``ModelState``, ``OptimizerState``) so FSDP2 ``DTensor`` shards are saved
as shards and resharded on load: a checkpoint written by 2 processes loads in 1 and vice versa. Works with no
process group as well (DCP's single-process mode).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from pretrain.utils.dist import is_dist, rank, world_size

__all__ = [
    "CheckpointInfo",
    "Checkpointer",
    "ModelState",
    "OptimizerState",
    "RNGState",
    "RankLocal",
    "dcp_to_state_dict",
    "full_state_dict",
]

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)$")
_MARKER = ".complete"
_META = "meta.json"


_is_dist, _rank, _world_size = is_dist, rank, world_size


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


class ModelState(Stateful):
    """A model (plain or FSDP2) as DCP state: sharded ``DTensor``s, keys without wrapper prefixes."""

    def __init__(self, model: nn.Module, *, strict: bool = True) -> None:
        self.model = model
        self.strict = strict

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=self.strict))


class OptimizerState(Stateful):
    """An optimizer as DCP state, keyed by parameter name (so it reshards with its model)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.absent_params: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Parameters that had no state when saved (never received a gradient, e.g. an unused mask token) got a
        # placeholder state when the load destination was built; drop it so the optimizer is exactly as saved.
        absent, self.absent_params = self.absent_params, set()
        if absent:
            state_dict = {**state_dict, "state": {k: v for k, v in state_dict["state"].items() if k not in absent}}
        options = StateDictOptions(strict=not absent)  # the absent entries were validated by _ResumeLoadPlanner
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=options)


class _ResumeLoadPlanner(DefaultLoadPlanner):
    """Strict load, except optimizer state of parameters that had none when saved (e.g. an unused mask token)."""

    def __init__(self, optimizers: dict[str, OptimizerState]) -> None:
        super().__init__()
        self.optimizers = optimizers

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        saved = set(metadata.state_dict_metadata) if metadata is not None else set()
        saved_params = {k.rsplit(".", 1)[0] for k in saved}
        for key in [k for k in self.state_dict if k not in saved]:
            name, _, rest = key.partition(".")
            param = rest.removeprefix("state.").rsplit(".", 1)[0]
            if name not in self.optimizers or not rest.startswith("state.") or f"{name}.state.{param}" in saved_params:
                raise ValueError(f"checkpoint has no entry {key!r}: it was saved from a different model or state")
            self.optimizers[name].absent_params.add(param)
            del self.state_dict[key]


class RankLocal(Stateful):
    """Marks state that differs per rank (data position, RNG): saved to ``rank-NNNNN.pt``, not through DCP.

    Restored only when the checkpoint was written with the same world size; otherwise it keeps its current value
    and ``CheckpointInfo.rank_local_restored`` is False.
    """

    rank_local = True

    def __init__(self, obj: Stateful | dict[str, Any]) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, Any]:
        return self.obj.state_dict() if isinstance(self.obj, Stateful) else dict(self.obj)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if isinstance(self.obj, Stateful):
            self.obj.load_state_dict(state_dict)
        else:
            self.obj.clear()
            self.obj.update(state_dict)


class RNGState(RankLocal):
    """Python, NumPy, torch CPU and CUDA generator states of this rank (rank-local)."""

    def __init__(self) -> None:
        super().__init__({})

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        np.random.set_state(state_dict["numpy"])
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``Checkpointer.load`` restored."""

    step: int
    """Training step the checkpoint was taken at."""
    path: Path
    """The committed ``step-N`` directory."""
    world_size: int
    """Number of processes that wrote it."""
    rank_local_restored: bool
    """False when the world size changed, so rank-local state (RNG, data position) was left as it was."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The JSON ``extra`` given to ``save``."""


def _split(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    global_state: dict[str, Any] = {}
    local_state: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"state key {key!r} must be a non-empty string without dots")
        if getattr(value, "rank_local", False):
            local_state[key] = value
        elif isinstance(value, (Stateful, dict)):
            global_state[key] = value
        else:
            raise ValueError(
                f"state[{key!r}] is a {type(value).__name__}: pass a Stateful (ModelState, OptimizerState, an "
                "object with state_dict/load_state_dict), a dict, or RankLocal(...) for per-rank state"
            )
    return global_state, local_state


def _check_dict_entries(global_state: Mapping[str, Any], saved: set[str], path: Path) -> None:
    """A plain dict is filled in place, so it must name every entry saved under it."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    for name, value in global_state.items():
        if isinstance(value, Stateful):
            continue
        have = set(flatten_state_dict({name: value})[0])
        lacking = sorted(k for k in saved if k.split(".", 1)[0] == name and k not in have)
        if lacking:
            raise ValueError(
                f"state[{name!r}] lacks saved entries {lacking} of {path}: pass a dict with the keys it had when "
                "saved (or a Stateful object)"
            )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class Checkpointer:
    """Save and restore training state as DCP checkpoints in ``directory/step-N``, keeping the last ``keep_last``.

    Every rank calls ``save`` and ``load`` (they contain collectives when a process group exists).
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int | None = 3) -> None:
        text = os.fspath(directory)
        if "://" in text:
            raise ValueError(
                f"checkpoint directory {text!r} must be a local or mounted shared filesystem path, not a URL"
            )
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1 (or None to keep every checkpoint)")
        self.directory = Path(text)
        self.keep_last = keep_last

    # ----------------------------------------------------------------------------------------------- queries
    def step_dir(self, step: int) -> Path:
        """The committed directory of ``step``."""
        return self.directory / f"step-{step}"

    def is_valid(self, step: int) -> bool:
        """True when ``step-N`` is committed: marker, DCP metadata and ``meta.json`` all present."""
        path = self.step_dir(step)
        return all((path / name).is_file() for name in (_MARKER, ".metadata", _META))

    def steps(self) -> list[int]:
        """Steps of all valid checkpoints, ascending."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_RE.match(entry.name)
            if match and entry.is_dir() and self.is_valid(int(match.group(1))):
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_valid(self) -> int | None:
        """The highest valid step, or None when there is none (incomplete saves are ignored)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def meta(self, step: int) -> dict[str, Any]:
        """``meta.json`` of a valid checkpoint: step, world_size, state_keys, rank_local_keys, created, extra."""
        if not self.is_valid(step):
            raise FileNotFoundError(f"checkpoint {self.step_dir(step)} does not exist or is incomplete")
        return json.loads((self.step_dir(step) / _META).read_text(encoding="utf-8"))

    # ---------------------------------------------------------------------------------------------- save/load
    def save(self, step: int, state: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``state`` (and the JSON ``extra``) as checkpoint ``step``; returns the committed directory.

        ``state`` maps names (no dots) to ``Stateful`` objects (``ModelState``, ``OptimizerState``, schedulers),
        plain dicts of tensors and values (identical on every rank unless sharded ``DTensor``s), or
        ``RankLocal``/``RNGState`` objects whose contents differ per rank.
        """
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        extra = dict(extra or {})
        try:
            extra_json = json.dumps(extra)
        except TypeError as exc:
            raise ValueError(f"extra must be JSON-serialisable: {exc}") from None
        global_state, local_state = _split(state)
        rank, world_size = _rank(), _world_size()
        tmp = self.directory / f".tmp-step-{step}"
        final = self.step_dir(step)
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        dcp.save(global_state, checkpoint_id=tmp, no_dist=not _is_dist())
        if local_state:
            local = {key: value.state_dict() for key, value in local_state.items()}
            torch.save(local, tmp / f"rank-{rank:05d}.pt")
        _barrier()
        if rank == 0:
            meta = {
                "step": step,
                "world_size": world_size,
                "state_keys": sorted(global_state),
                "rank_local_keys": sorted(local_state),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "extra": json.loads(extra_json),
            }
            _write_text(tmp / _META, json.dumps(meta, indent=2))
            _write_text(tmp / _MARKER, "")
            if final.exists():  # re-saving a step (e.g. resumed at N and saved N again): swap, then drop the old
                trash = self.directory / f".tmp-step-{step}.old"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
            logger.info("checkpoint step %d saved to %s (%d ranks)", step, final, world_size)
        _barrier()
        return final

    def load(self, step: int | str, state: Mapping[str, Any]) -> CheckpointInfo:
        """Restore ``state`` in place from checkpoint ``step`` (an int or ``"latest"``, the latest valid one).

        Tensors are resharded to the current world size; rank-local entries are restored only if the world size
        is unchanged. Raises ``FileNotFoundError`` when the checkpoint does not exist or is incomplete.
        """
        if step == "latest":
            latest = self.latest_valid()
            if latest is None:
                raise FileNotFoundError(f"no valid checkpoint under {self.directory}")
            step = latest
        if not isinstance(step, int):
            raise ValueError(f"step={step!r} must be an int or 'latest'")
        path = self.step_dir(step)
        meta = self.meta(step)
        global_state, local_state = _split(state)
        missing = sorted(set(global_state) - set(meta["state_keys"]))
        if missing:
            raise ValueError(f"checkpoint {path} has no state named {missing}; it holds {meta['state_keys']}")
        if global_state:
            reader = dcp.FileSystemReader(path)
            _check_dict_entries(global_state, set(reader.read_metadata().state_dict_metadata), path)
            planner = _ResumeLoadPlanner({k: v for k, v in global_state.items() if isinstance(v, OptimizerState)})
            try:
                dcp.load(global_state, storage_reader=reader, planner=planner, no_dist=not _is_dist())
            except CheckpointException as exc:  # surface our own ValueErrors instead of DCP's wrapper
                for failure in exc.failures.values():
                    inner = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
                    if isinstance(inner, ValueError):
                        raise ValueError(str(inner)) from exc
                raise
        restored = True
        if local_state:
            rank_file = path / f"rank-{_rank():05d}.pt"
            if meta["world_size"] == _world_size() and rank_file.is_file():
                local = torch.load(rank_file, map_location="cpu", weights_only=False)
                for key, value in local_state.items():
                    if key not in local:
                        raise ValueError(f"checkpoint {path} has no rank-local state {key!r}")
                    value.load_state_dict(local[key])
            else:
                restored = False
                if _rank() == 0:
                    logger.warning(
                        "checkpoint %s was written by %d processes, now %d: rank-local state %s starts fresh",
                        path, meta["world_size"], _world_size(), sorted(local_state),
                    )
        logger.info("checkpoint step %d loaded from %s", step, path)
        return CheckpointInfo(
            step=step, path=path, world_size=meta["world_size"], rank_local_restored=restored, extra=meta["extra"]
        )

    # ------------------------------------------------------------------------------------------------ pruning
    def _prune(self) -> None:
        steps = self.steps()
        if self.keep_last is not None:
            for old in steps[: -self.keep_last]:
                shutil.rmtree(self.step_dir(old), ignore_errors=True)
                logger.debug("pruned checkpoint step %d", old)
        latest = steps[-1] if steps else None
        for entry in self.directory.iterdir():  # uncommitted step dirs older than the latest valid one
            match = _STEP_RE.match(entry.name)
            if match and latest is not None and int(match.group(1)) < latest and not self.is_valid(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)


def full_state_dict(model: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Gather a full, unsharded CPU state dict of ``model`` (plain or FSDP2), keys in the model's own layout.

    A collective under a process group: every rank must call it. With ``rank0_only`` (default) only rank 0
    gets the tensors and other ranks get ``{}``. Feed the result to ``pretrain.models.export_backbone``.
    """
    if not _is_dist():
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    state = get_model_state_dict(model, options=options)
    return {k: v.detach().cpu() for k, v in state.items()}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def dcp_to_state_dict(checkpoint_dir: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    """Read a DCP checkpoint offline (no process group) into a flat dict of full tensors and values.

    Args:
        checkpoint_dir: a ``step-N`` directory, or a checkpoint directory (its latest valid step is used).
        prefix: keep only keys starting with it, with the prefix removed (e.g. ``"teacher.backbone."`` gives a
            backbone state dict in the official key layout).
    """
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        latest = Checkpointer(path).latest_valid()
        if latest is None:
            raise FileNotFoundError(f"{path} is neither a DCP checkpoint nor a directory with a valid step-N")
        path = Checkpointer(path).step_dir(latest)
    nested: dict[str, Any] = {}
    _load_state_dict(
        nested, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    flat = _flatten(nested)
    if not prefix:
        return flat
    selected = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if not selected:
        roots = sorted({k.split(".")[0] for k in flat})
        raise ValueError(f"no key in {path} starts with {prefix!r}; top-level names: {roots}")
    return selected
