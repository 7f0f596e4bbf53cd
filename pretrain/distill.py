"""``python -m pretrain distill RECIPE.toml --out RUN_DIR [--set a.b=v ...]``: DINOv2 distillation of a frozen
teacher into one or more students, each exported as the EMA of its weights.

This is the pretraining loop of :mod:`pretrain.train` (phases, schedules, DCP checkpoints with exact resume,
non-finite guard, metrics) with a different model: :class:`DistillTrainer` overrides the trainer's hooks to build
:class:`pretrain.ssl.distill_arch.DistillMetaArch` (frozen teacher in inference mode, students without masking or
drop-path, iBOT on every patch), to give every student its own optimizer parameter groups, clip each student
submodule separately, checkpoint only students + EMAs + centers (the teacher reloads from its file), and export
``export/<student>.pth`` (EMA backbone, official DINOv2 layout + ``.json`` sidecar), ``export/<student>_raw.pth``
(the trained weights before averaging) and ``export/<student>_heads.pth`` (EMA heads, so a student can teach).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import ModelState, OptimizerState, RankLocal, RNGState, full_state_dict
from pretrain.data.augment import MultiCropConfig
from pretrain.data.loader import WdsLoader
from pretrain.data.masking import MaskingConfig
from pretrain.data.wds import WdsConfig
from pretrain.metrics import vit_forward_flops
from pretrain.models import export_backbone
from pretrain.optim import OptimConfig, ScheduleConfig, build_param_groups
from pretrain.parallel import backbone_modules, parallelize
from pretrain.ssl.distill_arch import DistillMetaArch, StudentConfig, TeacherConfig
from pretrain.ssl.meta_arch import LossConfig
from pretrain.ssl.monitors import collapse_metrics
from pretrain.train import LoopConfig, Phase, PhaseConfig, Trainer
from pretrain.utils.config import load_config

logger = logging.getLogger("pretrain")

__all__ = ["DistillConfig", "DistillDataConfig", "DistillTrainer", "main"]


@dataclasses.dataclass(kw_only=True)
class DistillDataConfig:
    """Training data: WebDataset shards and multi-crop augmentation (no masking: students see every patch)."""

    shards: WdsConfig
    """Shard sets, batch size per rank, loader workers, shuffle buffer, seed."""
    crops: MultiCropConfig = dataclasses.field(default_factory=MultiCropConfig)
    """Multi-crop augmentation (sizes, scales, photometric augmentations)."""


@dataclasses.dataclass(kw_only=True)
class DistillConfig:
    """A whole distillation run (one TOML recipe)."""

    name: str = "distill"
    """Run name (logs)."""
    seed: int = 0
    """Seed of the students' init (data seeds are in data.shards.seed)."""
    teacher: TeacherConfig
    """The frozen teacher: backbone weights and its DINO/iBOT heads."""
    students: list[StudentConfig]
    """One or more students trained on the same batches (DINOv3-style multi-student distillation)."""
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Objective weights (iBOT is on all global-crop patches) and the teacher target normalisation."""
    feature_weight: float = 0.0
    """Weight of an optional feature-distillation term, not part of the DINOv2 recipe (0 = off, the paper's
    setting): ``1 - cos(W s, t)`` between each student's CLS token of a global crop, mapped by a trained linear
    ``feature_head``, and the teacher's CLS token of the same crop."""
    data: DistillDataConfig
    """Shards and crops."""
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    """Schedules (lr, wd, student-EMA momentum, teacher temperature, last-layer freeze)."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """AdamW, parameter groups (per student), clipping (per student submodule)."""
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    """Loop settings (precision, checkpoints, logging)."""
    phases: list[PhaseConfig] = dataclasses.field(default_factory=list)
    """Phases after the main one (e.g. the high-resolution phase of the released students)."""

    def __post_init__(self) -> None:
        if not self.students:
            raise ValueError("students: give at least one [[students]] entry")
        names = [s.name for s in self.students]
        if len(set(names)) != len(names):
            raise ValueError(f"students.name must be unique, got {names}")
        if not self.feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")


class DistillTrainer(Trainer):
    """:class:`pretrain.train.Trainer` with a frozen teacher and several students (see the module docstring)."""

    cfg: DistillConfig
    arch: DistillMetaArch

    def __init__(self, cfg: DistillConfig, out_dir: Any, *, init_method: str | None = None) -> None:
        super().__init__(cfg, out_dir, init_method=init_method)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ trainer hooks
    def build_model(self, mesh: Any, mp: str) -> list[dict]:
        loop = self.cfg.train
        self.arch = DistillMetaArch(self.cfg.teacher, self.cfg.students, self.cfg.loss,
                                    feature_weight=self.cfg.feature_weight).to(self.device)
        nets = [(self.arch.teacher, False)]
        for name in self.arch.students:  # a student and its EMA sharded alike -> shard-local EMA
            nets += [(self.arch.students[name], loop.activation_checkpointing), (self.arch.emas[name], False)]
        for net, ac in nets:
            parallelize(net, mesh=mesh, mp_policy=mp, activation_checkpointing=ac, compile=loop.compile)
            if mesh is not None:
                from torch.distributed.fsdp import register_fsdp_forward_method

                for _, backbone in backbone_modules(net):
                    for method in ("forward_features", "forward_features_list"):
                        register_fsdp_forward_method(backbone, method)
        groups = []
        for name, student in self.arch.students.items():
            for group in build_param_groups(student, self.cfg.optim):
                groups.append({**group, "student": name})
        if self.is_main:
            t = sum(p.numel() for p in self.arch.teacher.parameters())
            logger.info("frozen teacher %.2fM params; students: %s", t / 1e6, ", ".join(
                f"{n} ({self.arch.student_archs[n]}, {sum(p.numel() for p in s.parameters()) / 1e6:.2f}M)"
                for n, s in self.arch.students.items()))
        return groups

    def clip_modules(self) -> dict[str, nn.Module]:
        return {f"{name}.{child}": module for name, student in self.arch.students.items()
                for child, module in student.named_children()}

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        ex = out["extras"]
        metrics: dict[str, float] = {}
        for name, s in ex["students"].items():
            m = collapse_metrics(teacher_probs=ex["teacher_probs"], student_logits=s["cls_logits"],
                                 student_temp=self.cfg.loss.student_temp, embeddings=s["cls"].chunk(2)[0])
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
        return metrics

    def make_loader(self, phase: Phase) -> WdsLoader:
        shards = dataclasses.replace(self.cfg.data.shards, batch_size=phase.batch_size,
                                     seed=self.cfg.data.shards.seed + 1000 * phase.index)
        return WdsLoader(shards, phase.crops, patch_size=self.arch.patch_size, rank=self.info.rank,
                         world_size=self.info.world_size, masking=MaskingConfig(mask_probability=0.0))

    def _state(self, loader: WdsLoader | None) -> dict[str, Any]:
        state: dict[str, Any] = {
            "model": ModelState(self.arch.checkpoint_modules()),
            "optim": OptimizerState(self.arch.students, self.optimizer),
            "rng": RNGState(),
        }
        if loader is not None:
            state["data"] = RankLocal(loader)
        return state

    def _mfu(self, batch: dict[str, Any], dt: float) -> float | None:
        if self._peak is None:
            return None
        g, loc = batch["global_crops"], batch.get("local_crops")

        def fwd(net: nn.Module, x: torch.Tensor | None) -> float:
            if x is None or not x.numel():
                return 0.0
            c = net["backbone"].cfg
            tokens = (x.shape[-2] // c.patch_size) * (x.shape[-1] // c.patch_size) + 1 + c.num_register_tokens
            return vit_forward_flops(c.embed_dim, c.depth, int(c.embed_dim * c.mlp_ratio), tokens,
                                     c.ffn == "swiglu") * x.shape[0]

        flops = fwd(self.arch.teacher, g) + sum(3 * (fwd(s, g) + fwd(s, loc)) for s in self.arch.students.values())
        return flops / dt / self._peak

    # ------------------------------------------------------------------ export
    def export(self) -> None:
        """``export/<student>.pth`` (EMA), ``<student>_raw.pth`` and ``<student>_heads.pth`` for every student."""
        gathered = {name: (full_state_dict(self.arch.emas[name]), full_state_dict(self.arch.students[name]))
                    for name in self.arch.students}
        if not self.is_main:
            return
        out = self.out / "export"
        out.mkdir(parents=True, exist_ok=True)
        centers = {"dino_center": self.arch.dino_center.center.detach().cpu(),
                   "ibot_center": self.arch.ibot_center.center.detach().cpu()}
        for name, (ema, raw) in gathered.items():
            arch = self.arch.student_archs[name]
            cfg = self.arch.students[name]["backbone"].cfg
            for sd, path in ((ema, out / f"{name}.pth"), (raw, out / f"{name}_raw.pth")):
                export_backbone(sd, str(path), name=arch, prefix="backbone.")
                sidecar = path.with_name(path.name + ".json")
                meta = json.loads(sidecar.read_text())
                meta["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "attn_backend"}
                meta["config"]["drop_path_rate"] = 0.0
                meta["distilled_from"] = self.cfg.teacher.weights
                sidecar.write_text(json.dumps(meta, indent=2))
            heads = {k: v for k, v in ema.items() if not k.startswith("backbone.")}
            torch.save({"heads": heads, "centers": centers, "heads_config": dataclasses.asdict(self.arch.heads_cfg)},
                       out / f"{name}_heads.pth")
        logger.info("exported students %s (EMA backbones, raw backbones, heads) to %s", sorted(gathered), out)


def main(argv: list[str] | None = None) -> int:
    """Distil a frozen teacher into students: ``distill RECIPE.toml --out RUN_DIR [--set section.field=value ...]``."""
    p = argparse.ArgumentParser(prog="python -m pretrain distill", description=main.__doc__)
    p.add_argument("recipe", help="TOML recipe (see pretrain/recipes/distill_*.toml)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, tb/, export/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set teacher.weights=runs/g14/export/teacher.pth")
    args = p.parse_args(argv)
    cfg = load_config(DistillConfig, args.recipe, args.overrides)
    trainer = DistillTrainer(cfg, args.out)
    trainer.fit()
    return 0
