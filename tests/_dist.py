"""Run a function in N real gloo processes (spawned, ``file://`` rendezvous, loopback only) and collect results.

Usage from a test::

    def _check(rank, world_size, tmp):          # module level, so spawn can import it
        ...
        return some_picklable_value

    results = run_distributed(_check, tmp_path, world_size=2)   # [value of rank 0, value of rank 1]

Each child sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` and ``DINOFORGE_DIST_INIT_METHOD``
(a ``file://`` URL in a fresh temp dir), limits torch to one thread, and by default calls
``pretrain.parallel.init_distributed()`` before ``fn`` (``init=False`` leaves that to ``fn``, e.g. a trainer
``main(argv)`` that initialises itself). An exception in any rank is re-raised here with the child's
traceback; a rank that hangs past ``timeout_s`` fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["DistributedTestError", "run_distributed"]


class DistributedTestError(RuntimeError):
    """A rank failed (its traceback is in the message) or did not finish in time."""


def _child(rank: int, world_size: int, init_method: str, init: bool, fn: Callable, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        DINOFORGE_DIST_INIT_METHOD=init_method,
    )
    import torch

    torch.set_num_threads(1)
    from pretrain.parallel import destroy_distributed, init_distributed

    try:
        if init:
            init_distributed(backend="gloo")
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # every failure, KeyboardInterrupt included, must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_distributed(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, init: bool = True, timeout_s: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return the values ordered by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="dist-") as tmp:
        init_method = f"file://{os.path.join(tmp, 'pg')}"
        procs = [
            ctx.Process(target=_child, args=(r, world_size, init_method, init, fn, args, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        collected: dict[int, tuple[bool, Any]] = {}
        failure: str | None = None
        deadline = time.monotonic() + timeout_s
        try:
            while len(collected) < world_size and failure is None:
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue.Empty:
                    crashed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
                    if crashed:  # died without reporting (segfault, os._exit, OOM kill)
                        failure = f"ranks {crashed} exited with codes {[procs[r].exitcode for r in crashed]}"
                    elif time.monotonic() > deadline:
                        missing = sorted(set(range(world_size)) - set(collected))
                        failure = f"ranks {missing} gave no result in {timeout_s:.0f} s"
                    continue
                collected[rank] = (ok, value)
                if not ok:
                    failure = f"rank {rank} failed:\n{value}"
        finally:
            for p in procs:
                p.join(timeout=10 if failure is None else 2)
                if p.is_alive():
                    p.kill()
                    p.join()
        if failure is not None:
            raise DistributedTestError(failure)
    return [collected[r][1] for r in range(world_size)]
