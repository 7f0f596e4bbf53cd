"""``python -m pretrain train RECIPE.toml --out RUN_DIR [--set a.b=v ...]``: train any method (DINOv2 pretraining
by default, ``method = "distill"`` for distillation, ...), one process or many (torchrun / SLURM / Ray Train),
optionally ending with a high-resolution phase.

One :class:`Trainer` serves every method of :mod:`pretrain.methods`. Read top to bottom: config -> build (the
method's modules, FSDP2 sharding of its parts, optimizer, schedules) -> resume -> for each phase, for each batch:
schedules, the method's losses, non-finite guard, per-module clipping, step, the method's post-step updates (EMA,
queues) -> checkpoints -> the method's export.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.checkpoint import Checkpointer, RankLocal, RNGState
from pretrain.config import DataConfig, LoopConfig, MaskedDataConfig, PhaseConfig, TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.data.loader import WdsLoader
from pretrain.methods import Method, get_method
from pretrain.metrics import MetricsLogger, peak_flops, peak_memory_mb
from pretrain.optim import Schedules, apply_schedules, clip_grad_per_module
from pretrain.parallel import assert_same_sharding, device_mesh, init_distributed, parallelize
from pretrain.utils.config import dump_toml, load_config, to_dict

__all__ = ["DataConfig", "LoopConfig", "MaskedDataConfig", "Phase", "PhaseConfig", "TrainConfig", "Trainer", "cli",
           "main", "plan_phases"]

logger = logging.getLogger("pretrain")


@dataclasses.dataclass
class Phase:
    """A resolved phase: global iterations [start, end), its schedules, crops and batch size."""

    index: int
    name: str
    start: int
    end: int
    schedules: Schedules
    crops: MultiCropConfig
    batch_size: int


def plan_phases(cfg: TrainConfig, world_size: int) -> list[Phase]:
    """The main phase then each extra phase, schedules compressed into the phase length."""
    main = cfg.schedule
    bs = cfg.data.shards.batch_size
    phases = [Phase(0, "main", 0, main.total_iters, Schedules(main, bs * world_size), cfg.data.crops, bs)]
    start = main.total_iters
    for i, p in enumerate(cfg.phases, start=1):
        r = p.iters / main.total_iters
        sched = dataclasses.replace(
            main, epoch_length=1, epochs=p.iters, base_lr=main.base_lr if p.base_lr is None else p.base_lr,
            warmup_epochs=main.warmup_iters * r, warmup_teacher_temp_epochs=main.teacher_temp_warmup_iters * r,
            freeze_last_layer_epochs=p.freeze_last_layer_iters,
        )
        crops = dataclasses.replace(cfg.data.crops, global_size=p.global_size,
                                    local_size=p.local_size or cfg.data.crops.local_size,
                                    global_size_choices=tuple(p.global_sizes or ()),
                                    local_size_choices=tuple(p.local_sizes or ()), hires_factor=p.gram_upscale)
        pbs = p.batch_size or bs
        phases.append(Phase(i, p.name, start, start + p.iters, Schedules(sched, pbs * world_size), crops, pbs))
        start += p.iters
    return phases


# ----------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Runs one training run of any method: ``fit()`` trains, ``train_step()`` does one step.

    The method (``cfg.method``, see :mod:`pretrain.methods`) provides modules, views, parameter and clip groups,
    checkpoint state, losses, post-step updates, FLOPs and export; the Trainer owns the process group, FSDP2,
    the optimizer step, phases, DCP checkpoints and resume, the non-finite guard, metrics and the loop.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, init_method: str | None = None) -> None:
        method_cls = get_method(cfg.method)
        self.cfg, self.out = cfg, Path(out_dir)
        self.info = init_distributed(init_method=init_method)
        self.device = self.info.device
        self.is_main = self.info.is_main
        torch.manual_seed(cfg.seed)
        mesh = device_mesh(self.info)
        loop = cfg.train
        mp = "bf16" if loop.precision == "bf16" and mesh is not None else "fp32"
        self.method: Method = method_cls(cfg)
        self.arch = self.method.setup(self.device)
        self._shard(mesh, mp)
        groups = self.method.param_groups()
        self.optimizer = self.method.build_optimizer(groups)
        self.phases = plan_phases(cfg, self.info.world_size)
        self.total = self.phases[-1].end
        self.ckpt = Checkpointer(self.out / "checkpoints", keep_last=loop.keep_last)
        self.metrics = MetricsLogger(self.out, enabled=self.is_main, tensorboard=loop.tensorboard)
        self.bad_steps = 0
        self.autocast_dtype = torch.bfloat16 if loop.precision == "bf16" else None
        self._peak = peak_flops(self.device)
        self._resumed_loader: tuple[int, WdsLoader] | None = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(dump_toml(to_dict(cfg)))
            n = sum(p.numel() for g in groups for p in g["params"])
            logger.info("run %s (%s): %d processes, %.2fM trained params, %d iterations in %d phase(s)", cfg.name,
                        cfg.method, self.info.world_size, n / 1e6, self.total, len(self.phases))
            if summary := self.method.summary():
                logger.info("%s", summary)

    def _shard(self, mesh: Any, mp: str) -> None:
        """FSDP2 (or, without a mesh, only AC / compile) on every part; an EMA part is sharded like its source."""
        loop = self.cfg.train
        parts = {p.name: p for p in self.method.parts()}
        for part in parts.values():
            parallelize(part.module, mesh=mesh, mp_policy=mp, compile=loop.compile,
                        activation_checkpointing=loop.activation_checkpointing and part.kind == "trained",
                        forward_methods=part.forward_methods)
        for part in parts.values():
            if part.kind == "ema":
                if part.ema_of not in parts or parts[part.ema_of].kind != "trained":
                    raise ValueError(f"part {part.name}: ema_of={part.ema_of!r} is not a trained part")
                assert_same_sharding(part.module, parts[part.ema_of].module)

    def clip_modules(self) -> dict[str, torch.nn.Module]:
        """The method's separately clipped submodules (their grad norms are logged as ``grad_norm/<name>``)."""
        return self.method.clip_modules()

    # ------------------------------------------------------------------ state
    def checkpoint_state(self, loader: WdsLoader | None) -> dict[str, Any]:
        """The method's model and optimizer state, this rank's RNG and (when given) its data position."""
        state = {**self.method.checkpoint_state(self.optimizer), "rng": RNGState()}
        if loader is not None:
            state["data"] = RankLocal(loader)
        return state

    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if step < phase.end:
                return phase
        return self.phases[-1]

    def make_loader(self, phase: Phase) -> WdsLoader:
        """This rank's loader of ``phase``: the method's views of the shards, reseeded per phase."""
        views = self.method.views(phase.crops)
        if views.crops.hires_factor != 1:
            raise ValueError(f"phases.gram_upscale: method {self.cfg.method!r} does not use high-resolution crops "
                             "(DINOv2 with Gram anchoring does)")
        shards = dataclasses.replace(self.cfg.data.shards, batch_size=phase.batch_size,
                                     seed=self.cfg.data.shards.seed + 1000 * phase.index)
        return WdsLoader(shards, views.crops, patch_size=views.patch_size, rank=self.info.rank,
                         world_size=self.info.world_size, masking=views.masking)

    def resume(self) -> int:
        """Load the latest valid checkpoint if any; returns the next iteration to run."""
        latest = self.ckpt.latest_valid()
        if latest is None:
            return 0
        meta = self.ckpt.meta(latest)
        if meta["extra"].get("method", self.cfg.method) != self.cfg.method:
            raise ValueError(f"method: {self.ckpt.step_dir(latest)} was written by method "
                             f"{meta['extra']['method']!r}, this run is {self.cfg.method!r}; use another --out")
        same_world = meta.get("world_size") == self.info.world_size
        step = int(meta["extra"]["next_step"])
        phase = self.phase_at(step)
        loader = self.make_loader(phase)
        same_phase = meta["extra"].get("phase") == phase.index  # else the checkpoint closed the previous phase
        state = self.checkpoint_state(loader if same_world and same_phase else None)
        self.ckpt.load(latest, state)
        if same_phase and not same_world:
            data = meta["extra"].get("data_batches", 0)
            logger.warning("resuming on %d processes from a %s-process checkpoint: model and optimizer are exact, "
                           "the data streams restart reseeded after %d batches", self.info.world_size,
                           meta.get("world_size"), data)
            loader.restart_at(data)
        self._resumed_loader = (phase.index, loader)
        logger.info("resumed from checkpoint step %d", latest)
        return step

    def save(self, step: int, phase: Phase, loader: WdsLoader | None) -> None:
        extra = {"next_step": step, "phase": phase.index, "method": self.cfg.method,
                 "data_batches": loader.batches_consumed if loader is not None else 0}
        self.ckpt.save(step, self.checkpoint_state(loader), extra=extra)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict[str, Any], step: int, phase: Phase) -> dict[str, Any] | None:
        """One optimisation step; returns its metrics, or None when it was skipped as non-finite."""
        values = phase.schedules.at(step - phase.start)
        apply_schedules(self.optimizer, values)
        self.method.adjust_lr(self.optimizer, values)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        t0 = time.perf_counter()
        self.method.train_mode()
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else torch.autocast(self.device.type, enabled=False))
        with ctx:
            loss, out = self.method.compute_losses(batch, values)
        loss.backward()
        norms = clip_grad_per_module(self.method.clip_modules(), self.cfg.optim.clip_grad)
        finite = math.isfinite(float(loss.detach())) and all(math.isfinite(v) for v in norms.values())
        bad_ranks = self._bad_ranks(finite)
        if bad_ranks:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            logger.warning("step %d skipped: non-finite loss or gradient on rank(s) %s (%d in a row)", step,
                           bad_ranks, self.bad_steps)
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise RuntimeError(f"{self.bad_steps} consecutive non-finite steps (last at iteration {step}) on "
                                   f"rank(s) {bad_ranks}: lower the lr, check the data, or use fp32")
            return None
        self.bad_steps = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(values)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        metrics: dict[str, Any] = {f"{k}": float(v) for k, v in out["losses"].items()}
        metrics["loss"] = metrics.pop("total")
        metrics.update(lr=values.lr, wd=values.weight_decay, momentum=values.momentum,
                       teacher_temp=values.teacher_temp, phase=phase.index, step_s=dt,
                       crop_px=int(batch["global_crops"].shape[-1]),
                       img_per_s=phase.batch_size * self.info.world_size / dt,
                       peak_mem_mb=peak_memory_mb(self.device),
                       **{f"grad_norm/{k}": v for k, v in norms.items()})
        metrics["mfu"] = self._mfu(batch, phase, dt)
        if (step + 1) % self.cfg.train.monitor_every == 0:  # aligned with logging, which counts finished steps
            metrics.update(self.method.monitor(out))
        return metrics

    def _bad_ranks(self, finite: bool) -> list[int]:
        if not (dist.is_available() and dist.is_initialized()):
            return [] if finite else [0]
        flags = [None] * self.info.world_size
        dist.all_gather_object(flags, finite)
        return [r for r, ok in enumerate(flags) if not ok]

    def _mfu(self, batch: dict[str, Any], phase: Phase, dt: float) -> float | None:
        if self._peak is None:
            return None
        per_sample = self.method.flops_per_sample(batch)
        return None if per_sample is None else per_sample * phase.batch_size / dt / self._peak

    # ------------------------------------------------------------------ the loop
    def fit(self) -> int:
        """Train from the latest checkpoint (or from scratch) to the end or ``train.stop_at``; returns the step."""
        loop = self.cfg.train
        step = self.resume()
        stop = self.total if loop.stop_at is None else min(loop.stop_at, self.total)
        for phase in self.phases:
            if step >= phase.end or step >= stop:
                continue
            resumed = self._resumed_loader
            loader = resumed[1] if resumed and resumed[0] == phase.index else self.make_loader(phase)
            self._resumed_loader = None
            logger.info("phase %s: iterations %d..%d, global crops %d px, batch %d per rank", phase.name,
                        phase.start, phase.end, phase.crops.global_size, phase.batch_size)
            for batch in _batches(loader):
                metrics = self.train_step(batch, step, phase)
                step += 1
                if metrics is not None and (step % loop.log_every == 0 or step == phase.end):
                    metrics.update({f"data/{k}": v for k, v in loader.metrics().items()})
                    self.metrics.log(step, metrics)
                    self.metrics.progress(step, self.total, metrics)
                if step % loop.checkpoint_every == 0 or step == phase.end or step == stop:
                    self.save(step, phase, loader)
                if step >= phase.end or step >= stop:
                    break
        if step >= self.total:
            self.export()
        self.metrics.close()
        return step

    def export(self) -> None:
        """The method's deliverables under ``RUN_DIR/export`` (every rank calls this; rank 0 writes)."""
        self.method.export(self.out / "export", is_main=self.is_main)


def _batches(loader: WdsLoader) -> Iterator[dict[str, Any]]:
    """Iterate ``loader`` without touching the global torch RNG (the DataLoader draws its base seed from it), so
    the RNG stream that drives stochastic depth is the same in a resumed run and an uninterrupted one."""
    it = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


# ----------------------------------------------------------------------------------------------------- CLI
def cli(argv: list[str] | None, config_class: type[TrainConfig], *, prog: str, description: str | None,
        example: str) -> int:
    """Parse ``RECIPE.toml --out RUN_DIR [--set section.field=value ...]``, build ``config_class`` and train."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("recipe", help="TOML recipe (see pretrain/recipes/)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, tb/, export/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe field, e.g. --set {example} (repeatable)")
    args = p.parse_args(argv)
    cfg = load_config(config_class, args.recipe, args.overrides)
    Trainer(cfg, args.out).fit()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train from a TOML recipe: ``train RECIPE.toml --out RUN_DIR [--set section.field=value ...]``; the recipe's
    ``method`` field (default "dinov2") picks the method."""
    return cli(argv, TrainConfig, prog="python -m pretrain train", description=main.__doc__,
               example="schedule.base_lr=1e-3")
