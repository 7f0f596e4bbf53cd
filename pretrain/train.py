"""``python -m pretrain train RECIPE.toml --out RUN_DIR [--set a.b=v ...]``: DINOv2 pretraining, one process or
many (torchrun / SLURM / Ray Train), optionally ending with a high-resolution phase.

Read top to bottom: config -> build (model, sharding, optimizer, schedules) -> resume -> for each phase, for each
batch: schedules, teacher + packed student forward, objective, non-finite guard, clip, step, EMA -> checkpoints
-> export of the teacher (official DINOv2 backbone layout) and heads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.checkpoint import Checkpointer, ModelState, OptimizerState, RankLocal, RNGState, full_state_dict
from pretrain.data.augment import MultiCropConfig
from pretrain.data.loader import WdsLoader
from pretrain.data.masking import MaskingConfig
from pretrain.data.wds import WdsConfig
from pretrain.metrics import MetricsLogger, peak_flops, peak_memory_mb, vit_forward_flops
from pretrain.models import export_backbone
from pretrain.models.heads import HeadsConfig
from pretrain.optim import (
    OptimConfig,
    ScheduleConfig,
    Schedules,
    apply_schedules,
    build_optimizer,
    build_param_groups,
    clip_grad_per_module,
)
from pretrain.parallel import device_mesh, init_distributed, parallelize
from pretrain.ssl.meta_arch import BackboneConfig, LossConfig, SSLMetaArch
from pretrain.ssl.monitors import collapse_metrics
from pretrain.utils.config import dump_toml, load_config, to_dict

logger = logging.getLogger("pretrain")


# ----------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Training data: WebDataset shards, multi-crop augmentation and iBOT masking."""

    shards: WdsConfig
    """Shard sets, batch size per rank, loader workers, shuffle buffer, seed."""
    crops: MultiCropConfig = dataclasses.field(default_factory=MultiCropConfig)
    """Multi-crop augmentation (sizes, scales, photometric augmentations)."""
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

    def __post_init__(self) -> None:
        if self.iters < 2:
            raise ValueError(f"phases.iters must be >= 2, got {self.iters}")
        if self.global_size < 1:
            raise ValueError(f"phases.global_size must be >= 1, got {self.global_size}")
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
    """Recompute block activations in backward."""
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
    """A whole pretraining run (one TOML recipe)."""

    name: str = "run"
    """Run name (logs)."""
    seed: int = 0
    """Seed of model init (data seeds are in data.shards.seed)."""
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    """Student/teacher ViT."""
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    """DINO / iBOT heads."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Objective weights and target normalisation."""
    data: DataConfig
    """Shards, crops, masking."""
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    """Main-phase schedules (lr, wd, momentum, teacher temperature, last-layer freeze)."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """AdamW, parameter groups, clipping."""
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    """Loop settings (precision, checkpoints, logging)."""
    phases: list[PhaseConfig] = dataclasses.field(default_factory=list)
    """Phases after the main one (e.g. the high-resolution phase)."""


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
                                    local_size=p.local_size or cfg.data.crops.local_size)
        pbs = p.batch_size or bs
        phases.append(Phase(i, p.name, start, start + p.iters, Schedules(sched, pbs * world_size), crops, pbs))
        start += p.iters
    return phases


# ----------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the model, optimizer and checkpoints of one run; ``fit()`` trains, ``train_step()`` does one step."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, init_method: str | None = None) -> None:
        self.cfg, self.out = cfg, Path(out_dir)
        self.info = init_distributed(init_method=init_method)
        self.device = self.info.device
        self.is_main = self.info.is_main
        torch.manual_seed(cfg.seed)
        mesh = device_mesh(self.info)
        loop = cfg.train
        mp = "bf16" if loop.precision == "bf16" and mesh is not None else "fp32"
        groups = self.build_model(mesh, mp)
        if loop.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=0.0)
        else:
            self.optimizer = build_optimizer(groups, cfg.optim)
        self.phases = plan_phases(cfg, self.info.world_size)
        self.total = self.phases[-1].end
        self.ckpt = Checkpointer(self.out / "checkpoints", keep_last=loop.keep_last)
        self.metrics = MetricsLogger(self.out, enabled=self.is_main, tensorboard=loop.tensorboard)
        self.bad_steps = 0
        self.autocast_dtype = torch.bfloat16 if loop.precision == "bf16" else None
        self._peak = peak_flops(self.device)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(dump_toml(to_dict(cfg)))
            n = sum(g["n_params"] for g in groups)
            logger.info("run %s: %d processes, %.2fM trained params, %d iterations in %d phase(s)",
                        cfg.name, self.info.world_size, n / 1e6, self.total, len(self.phases))

    # ------------------------------------------------------------------ hooks (pretrain.distill overrides them)
    def build_model(self, mesh: Any, mp: str) -> list[dict]:
        """Build ``self.arch`` on the device, shard it, and return the optimizer's parameter groups."""
        loop = self.cfg.train
        self.arch = SSLMetaArch(self.cfg.backbone, self.cfg.heads, self.cfg.loss).to(self.device)
        for net in (self.arch.student, self.arch.teacher):  # identical sharding -> shard-local EMA
            parallelize(net, mesh=mesh, mp_policy=mp, activation_checkpointing=loop.activation_checkpointing,
                        compile=loop.compile, forward_methods=("forward_features", "forward_features_list"))
        return build_param_groups(self.arch.student, self.cfg.optim)

    def clip_modules(self) -> dict[str, torch.nn.Module]:
        """The submodules whose gradients are clipped separately (DINOv2: backbone, dino_head, ibot_head)."""
        return dict(self.arch.student.named_children())

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        """Collapse monitors from the extras of ``compute_losses`` (every ``train.monitor_every`` steps)."""
        ex = out["extras"]
        return collapse_metrics(teacher_probs=ex["teacher_probs"], student_logits=ex["student_cls_logits"],
                                student_temp=self.cfg.loss.student_temp, embeddings=ex["teacher_cls"].chunk(2)[0])

    # ------------------------------------------------------------------ state
    def _state(self, loader: WdsLoader | None) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": ModelState(self.arch),  # student, teacher and the softmax centers
            "optim": OptimizerState(self.arch.student, self.optimizer),
            "rng": RNGState(),
        }
        if loader is not None:
            state["data"] = RankLocal(loader)
        return state

    def phase_at(self, step: int) -> Phase:
        for phase in self.phases:
            if step < phase.end:
                return phase
        return self.phases[-1]

    def make_loader(self, phase: Phase) -> WdsLoader:
        shards = dataclasses.replace(self.cfg.data.shards, batch_size=phase.batch_size,
                                     seed=self.cfg.data.shards.seed + 1000 * phase.index)
        return WdsLoader(shards, phase.crops, patch_size=self.arch.student["backbone"].patch_size,
                         rank=self.info.rank, world_size=self.info.world_size, masking=self.cfg.data.masking)

    def resume(self) -> int:
        """Load the latest valid checkpoint if any; returns the next iteration to run."""
        latest = self.ckpt.latest_valid()
        if latest is None:
            return 0
        meta = self.ckpt.meta(latest)
        same_world = meta.get("world_size") == self.info.world_size
        step = int(meta["extra"]["next_step"])
        phase = self.phase_at(step)
        loader = self.make_loader(phase)
        same_phase = meta["extra"].get("phase") == phase.index  # else the checkpoint closed the previous phase
        state = self._state(loader if same_world and same_phase else None)
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
        extra = {"next_step": step, "phase": phase.index,
                 "data_batches": loader.batches_consumed if loader is not None else 0}
        self.ckpt.save(step, self._state(loader), extra=extra)

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict[str, Any], step: int, phase: Phase) -> dict[str, Any] | None:
        """One optimisation step; returns its metrics, or None when it was skipped as non-finite."""
        values = phase.schedules.at(step - phase.start)
        apply_schedules(self.optimizer, values)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        t0 = time.perf_counter()
        self.arch.train()
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else torch.autocast(self.device.type, enabled=False))
        with ctx:
            loss, out = self.arch.compute_losses(batch, values.teacher_temp)
        loss.backward()
        norms = clip_grad_per_module(self.clip_modules(), self.cfg.optim.clip_grad)
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
        self.arch.update_teacher(values.momentum)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        metrics: dict[str, Any] = {f"{k}": float(v) for k, v in out["losses"].items()}
        metrics["loss"] = metrics.pop("total")
        metrics.update(lr=values.lr, wd=values.weight_decay, momentum=values.momentum,
                       teacher_temp=values.teacher_temp, phase=phase.index, step_s=dt,
                       img_per_s=phase.batch_size * self.info.world_size / dt,
                       peak_mem_mb=peak_memory_mb(self.device),
                       **{f"grad_norm/{k}": v for k, v in norms.items()})
        metrics["mfu"] = self._mfu(batch, dt)
        if (step + 1) % self.cfg.train.monitor_every == 0:  # aligned with logging, which counts finished steps
            metrics.update(self.monitor(out))
        return metrics

    def _bad_ranks(self, finite: bool) -> list[int]:
        if not (dist.is_available() and dist.is_initialized()):
            return [] if finite else [0]
        flags = [None] * self.info.world_size
        dist.all_gather_object(flags, finite)
        return [r for r, ok in enumerate(flags) if not ok]

    def _mfu(self, batch: dict[str, Any], dt: float) -> float | None:
        if self._peak is None:
            return None
        c = self.arch.student["backbone"].cfg
        hidden = int(c.embed_dim * c.mlp_ratio)
        swiglu = c.ffn == "swiglu"
        extra = 1 + c.num_register_tokens

        def tokens(x: torch.Tensor) -> int:
            return (x.shape[-2] // c.patch_size) * (x.shape[-1] // c.patch_size) + extra

        g, loc = batch["global_crops"], batch.get("local_crops")
        f_g = vit_forward_flops(c.embed_dim, c.depth, hidden, tokens(g), swiglu) * g.shape[0]
        f_l = vit_forward_flops(c.embed_dim, c.depth, hidden, tokens(loc), swiglu) * loc.shape[0] if (
            loc is not None and loc.numel()) else 0.0
        flops = 3 * (f_g + f_l) + f_g  # student forward + backward, teacher forward
        return flops / dt / self._peak

    # ------------------------------------------------------------------ the loop
    def fit(self) -> int:
        """Train from the latest checkpoint (or from scratch) to the end or ``train.stop_at``; returns the step."""
        loop = self.cfg.train
        step = self.resume()
        stop = self.total if loop.stop_at is None else min(loop.stop_at, self.total)
        for phase in self.phases:
            if step >= phase.end or step >= stop:
                continue
            resumed = getattr(self, "_resumed_loader", None)
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
        """Write export/teacher.pth (official backbone layout), the teacher heads, and the student backbone."""
        teacher = full_state_dict(self.arch.teacher)
        student = full_state_dict(self.arch.student)
        if not self.is_main:
            return
        out = self.out / "export"
        out.mkdir(parents=True, exist_ok=True)
        name = self.cfg.backbone.name
        cfg = self.arch.student["backbone"].cfg
        export_backbone({k: v for k, v in teacher.items()}, str(out / "teacher.pth"), name=name, prefix="backbone.")
        export_backbone({k: v for k, v in student.items()}, str(out / "student.pth"), name=name, prefix="backbone.")
        for path in (out / "teacher.pth.json", out / "student.pth.json"):
            meta = json.loads(path.read_text())
            meta["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "attn_backend"}
            meta["config"]["drop_path_rate"] = 0.0
            path.write_text(json.dumps(meta, indent=2))
        heads = {k: v for k, v in teacher.items() if not k.startswith("backbone.")}
        centers = {"dino_center": self.arch.dino_center.center.detach().cpu(),
                   "ibot_center": self.arch.ibot_center.center.detach().cpu()}
        torch.save({"heads": heads, "centers": centers, "heads_config": dataclasses.asdict(self.cfg.heads)},
                   out / "teacher_heads.pth")
        logger.info("exported teacher/student backbones and heads to %s", out)


def _batches(loader: WdsLoader):
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
def main(argv: list[str] | None = None) -> int:
    """Pretrain from a TOML recipe: ``train RECIPE.toml --out RUN_DIR [--set section.field=value ...]``."""
    p = argparse.ArgumentParser(prog="python -m pretrain train", description=main.__doc__)
    p.add_argument("recipe", help="TOML recipe (see pretrain/recipes/)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, tb/, export/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set schedule.base_lr=1e-3 (repeatable)")
    args = p.parse_args(argv)
    cfg = load_config(TrainConfig, args.recipe, args.overrides)
    trainer = Trainer(cfg, args.out)
    trainer.fit()
    return 0
