"""Process-group setup: one call that works under torchrun, SLURM ``srun``, Ray Train, tests and a plain ``python``.

``init_distributed()`` reads the launcher's environment, picks gloo on CPU or NCCL on GPU, and returns a
``DistInfo``. A single process (no launcher, or a world size of 1) gets no process group at all, so the
single-process code paths never call a collective. A process group that already exists (Ray Train creates its
own before the train function runs) is adopted as is.

Environment read, first match wins:

- torchrun / Ray Train / ``torch.distributed.launch``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, with ``MASTER_ADDR``/``MASTER_PORT`` for the ``env://`` rendezvous.
- SLURM with one task per device (``srun python -m ...``): ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, ``SLURM_NTASKS_PER_NODE``; ``MASTER_ADDR`` must be exported by the batch script.
- ``DINOFORGE_DIST_INIT_METHOD`` overrides the init method (tests use ``file:///tmp/x`` so that nothing listens
  beyond loopback).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Mapping

import torch
import torch.distributed as dist

__all__ = [
    "INIT_METHOD_ENV",
    "DistInfo",
    "LaunchEnv",
    "barrier",
    "destroy_distributed",
    "device_mesh",
    "get_dist_info",
    "init_distributed",
    "read_launch_env",
]

logger = logging.getLogger(__name__)

#: Environment variable that overrides the process-group init method (e.g. ``file:///tmp/pg`` in tests).
INIT_METHOD_ENV = "DINOFORGE_DIST_INIT_METHOD"

_BACKENDS = ("auto", "gloo", "nccl")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank of this process on its node (selects the GPU)."""
    local_world_size: int
    """Number of processes on this node."""
    source: str
    """Which launcher the values came from: ``torchrun``, ``slurm`` or ``single``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistInfo:
    """The process's place in the job plus the device it computes on."""

    rank: int
    """Global rank (0 without a process group)."""
    world_size: int
    """Number of processes (1 without a process group)."""
    local_rank: int
    """Rank on this node."""
    local_world_size: int
    """Processes on this node."""
    backend: str | None
    """``gloo`` or ``nccl``; None when no process group was created."""
    device: torch.device
    """``cuda:<local_rank>`` with NCCL, else ``cpu``."""

    @property
    def is_distributed(self) -> bool:
        """True when a process group exists and collectives must be used."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs and writes single files)."""
        return self.rank == 0


def _int_env(env: Mapping[str, str], name: str) -> int:
    text = env[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} must be an integer") from None


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank and world size from a torchrun-style or SLURM environment (``os.environ`` by default)."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise ValueError(f"launcher environment is incomplete: set {' and '.join(missing)} as well")
        world_size = _int_env(env, "WORLD_SIZE")
        local_world_size = _int_env(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
        rank = _int_env(env, "RANK")
        local_rank = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank % local_world_size
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank = _int_env(env, "SLURM_PROCID")
        world_size = _int_env(env, "SLURM_NTASKS")
        local_rank = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        # SLURM_NTASKS_PER_NODE may read "4" or "4(x2)"; the leading count is this node's.
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_world_size = int(per_node) if per_node.isdigit() else 1
        source = "slurm"
    else:
        return LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, source="single")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}: check RANK/WORLD_SIZE (or SLURM_*)")
    if not 0 <= local_rank < max(local_world_size, 1):
        raise ValueError(f"local rank {local_rank} is outside local world size {local_world_size}")
    return LaunchEnv(
        rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size, source=source
    )


def _resolve_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported: use one of {', '.join(_BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA devices; use backend='gloo' (or 'auto') on CPU")
    return backend


def _device_for(backend: str | None, local_rank: int) -> torch.device:
    if backend == "nccl" or (backend is None and torch.cuda.is_available()):
        # Ray Train names each worker's GPU in ACCELERATE_TORCH_DEVICE (its workers may see all GPUs of the node);
        # torchrun/SLURM give one process per GPU in local-rank order.
        named = os.environ.get("ACCELERATE_TORCH_DEVICE", "")
        if named.startswith("cuda:") and named[5:].isdigit():
            index = int(named[5:])
        else:
            index = local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def get_dist_info() -> DistInfo:
    """Describe the current process from the existing process group (or a single process when there is none)."""
    launch = read_launch_env()
    if not (dist.is_available() and dist.is_initialized()):
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, backend=None, device=device)
    backend = str(dist.get_backend())
    uses_nccl = "nccl" in backend
    device = _device_for("nccl", launch.local_rank) if uses_nccl else torch.device("cpu")
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=launch.local_rank,
        local_world_size=launch.local_world_size,
        backend="nccl" if uses_nccl else backend,
        device=device,
    )


def init_distributed(
    backend: str = "auto",
    *,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Create (or adopt) the process group for this process and return where it sits.

    Args:
        backend: ``"auto"`` (NCCL when CUDA is available, else gloo), ``"gloo"`` or ``"nccl"``.
        init_method: rendezvous URL (``env://``, ``tcp://h:p``, ``file:///path``); default: the
            ``DINOFORGE_DIST_INIT_METHOD`` variable, else ``env://``.
        rank: global rank; default from the launcher environment.
        world_size: number of processes; default from the launcher environment.
        timeout_s: collective timeout in seconds.

    A world size of 1 creates no process group unless an explicit ``init_method`` asks for one.
    """
    resolved_backend = _resolve_backend(backend)
    if dist.is_available() and dist.is_initialized():
        info = get_dist_info()
        logger.debug("adopting existing process group: rank %d of %d (%s)", info.rank, info.world_size, info.backend)
        return info
    launch = read_launch_env()
    rank = launch.rank if rank is None else rank
    world_size = launch.world_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    local_rank = launch.local_rank if launch.source != "single" else rank
    local_world_size = launch.local_world_size if launch.source != "single" else world_size
    init_method = init_method or os.environ.get(INIT_METHOD_ENV)
    if world_size == 1 and init_method is None:
        device = _device_for(None, local_rank)
        return DistInfo(
            rank=0, world_size=1, local_rank=0, local_world_size=1, backend=None, device=device
        )
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if init_method is None:
        init_method = "env://"
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if "MASTER_ADDR" in missing:
            raise ValueError(
                f"world size {world_size} needs a rendezvous: export MASTER_ADDR (and MASTER_PORT), launch with "
                f"torchrun, or set {INIT_METHOD_ENV}"
            )
        if missing:
            os.environ["MASTER_PORT"] = "29500"
    device = _device_for(resolved_backend, local_rank)
    kwargs = {"device_id": device} if resolved_backend == "nccl" else {}
    dist.init_process_group(
        resolved_backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    logger.info("process group up: rank %d of %d, backend %s, device %s", rank, world_size, resolved_backend, device)
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        backend=resolved_backend,
        device=device,
    )


def device_mesh(info: DistInfo):
    """A 1-D data-parallel ``DeviceMesh`` over all ranks (dim name ``dp``), or None without a process group."""
    if not info.is_distributed:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    """Tear down the process group if this process has one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
