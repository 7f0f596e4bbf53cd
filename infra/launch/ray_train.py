"""Ray Train entrypoint: FSDP pretraining on a Ray cluster with ``TorchTrainer``.

Submit from the repository root (the working dir is shipped to the cluster)::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m infra.launch.ray_train --recipe pretrain/recipes/vitl14.toml --out /shared/runs/vitl14 \\
            --num-workers 16 --use-gpu --set optim.base_lr=2e-3

Ray Train starts ``--num-workers`` worker processes (one per GPU with ``--use-gpu``), creates the torch process
group (NCCL on GPU, gloo on CPU) and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; each worker then calls the
trainer entry ``pretrain.train:main(argv)`` with ``argv = [RECIPE, "--out", OUT, "--set", KV, ...]``, the same
arguments as ``python -m pretrain train``. ``pretrain.parallel.init_distributed()`` adopts Ray's process group.
After a worker failure Ray restarts the group (``--max-failures``) and the trainer resumes from the latest valid
checkpoint in ``OUT/checkpoints``, so ``OUT`` must be on storage every node sees.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "main", "resolve_entry", "train_argv", "train_loop_per_worker"]

logger = logging.getLogger("infra.launch.ray_train")

DEFAULT_ENTRY = "pretrain.train:main"


def train_argv(recipe: str, out: str, overrides: Sequence[str] = ()) -> list[str]:
    """The trainer's argv: ``[recipe, "--out", out]`` plus ``["--set", kv]`` per override."""
    argv = [recipe, "--out", out]
    for kv in overrides:
        if "=" not in kv:
            raise ValueError(f"override {kv!r} must look like section.field=value")
        argv += ["--set", kv]
    return argv


def resolve_entry(path: str) -> Callable[[list[str]], Any]:
    """Import ``"package.module:function"`` and return the function."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--entry {path!r} must look like package.module:function")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--entry {path!r}: {module_name} has no callable {attr!r}")
    return fn


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: call the trainer entry with the trainer argv (imported lazily here)."""
    # Relative paths (recipe, shard URLs) mean the submit directory: the driver's cwd when this node has it,
    # else the worker's default cwd (the unpacked `--working-dir` of `ray job submit`).
    driver_cwd = config.get("cwd")
    if driver_cwd and os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)
    entry = resolve_entry(config["entry"])
    entry(list(config["argv"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infra.launch.ray_train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", required=True, help="TOML recipe passed to the trainer")
    parser.add_argument("--out", required=True, help="run directory on shared storage (checkpoints, metrics)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, repeatable")
    parser.add_argument("--num-workers", type=int, required=True, help="number of training processes")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL process group")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="restarts of the worker group after a failure (each resumes from the checkpoint)")
    parser.add_argument("--entry", default=DEFAULT_ENTRY,
                        help=f"trainer entry function, module:function taking argv (default {DEFAULT_ENTRY})")
    parser.add_argument("--address", default=None,
                        help="Ray address (default: the cluster of `ray job submit`, or RAY_ADDRESS); "
                             "'local' starts an in-process Ray")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of an in-process Ray (--address local)")
    parser.add_argument("--storage-path", default=None,
                        help="Ray Train storage for run metadata (default: OUT/ray_train)")
    parser.add_argument("--name", default=None, help="Ray Train run name (default: the run directory's name)")
    return parser


def _validate(args: argparse.Namespace) -> None:
    if args.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.max_failures < -1:
        raise ValueError(f"--max-failures must be >= 0 (or -1 for unlimited), got {args.max_failures}")
    resolve_entry(args.entry)  # fail on the driver, before any worker starts


def main(argv: Sequence[str] | None = None):
    """Parse the arguments, start ``TorchTrainer.fit()`` and return its ``Result``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _validate(args)
        out = os.path.abspath(args.out) if "://" not in args.out else args.out  # the same on every node
        trainer_args = train_argv(args.recipe, out, args.overrides)
    except ValueError as exc:
        build_parser().error(str(exc))

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        init_kwargs: dict[str, Any] = {"include_dashboard": False} if args.address == "local" else {}
        if args.num_cpus is not None:
            init_kwargs["num_cpus"] = args.num_cpus
        ray.init(address=args.address, **init_kwargs)
    # Ray Train would move each worker into a per-run directory; keep the submit directory so relative recipe
    # and data paths resolve the same way as with torchrun.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    storage = args.storage_path or (os.path.join(out, "ray_train") if "://" not in out else None)
    name = args.name or os.path.basename(out.rstrip("/")) or "dinoforge"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "entry": args.entry,
            "argv": trainer_args,
            "cwd": os.getcwd(),
        },
        scaling_config=ScalingConfig(
            num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker={"CPU": args.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name, storage_path=storage, failure_config=FailureConfig(max_failures=args.max_failures)
        ),
    )
    logger.info("starting %d %s workers: %s %s", args.num_workers, "GPU" if args.use_gpu else "CPU", args.entry,
                " ".join(trainer_args))
    result = trainer.fit()
    logger.info("training finished: %s", result.path)
    return result


if __name__ == "__main__":
    main()
