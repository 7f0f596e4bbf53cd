"""The method protocol: the registry, recipes selecting their method, and a toy method defined here that the
unchanged Trainer trains, checkpoints and resumes bitwise (so a new method needs no Trainer change)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.checkpoint import dcp_to_state_dict, full_state_dict
from pretrain.config import TrainConfig
from pretrain.data.augment import MultiCropConfig
from pretrain.distill import DistillConfig
from pretrain.methods import (
    METHODS,
    DINOv2Config,
    DINOv2Method,
    DistillMethod,
    LossOutput,
    Method,
    Part,
    Views,
    get_method,
    register_method,
)
from pretrain.optim import ScheduleValues, build_param_groups
from pretrain.train import Trainer, main
from pretrain.utils.config import load_config

from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"


# ---------------------------------------------------------------------------------------------- a toy method
@dataclasses.dataclass(kw_only=True)
class ToySection:
    """The toy method's own settings."""

    dim: int = 8
    """Embedding width."""
    queue_size: int = 16
    """Negatives kept in the queue (a MoCo-style memory)."""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.queue_size < 1:
            raise ValueError(f"toy.dim and toy.queue_size must be >= 1, got {self.dim}, {self.queue_size}")


@dataclasses.dataclass(kw_only=True)
class ToyConfig(TrainConfig):
    method: str = "toy"
    toy: ToySection = dataclasses.field(default_factory=ToySection)


class ToyArch(nn.Module):
    """Linear online encoder (with dropout: it draws from the RNG) + predictor, an EMA target, a key queue."""

    def __init__(self, dim: int, queue_size: int) -> None:
        super().__init__()
        self.online = nn.ModuleDict({"encoder": nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Dropout(0.1),
                                                              nn.Linear(3 * 7 * 7, dim)),
                                     "predictor": nn.Linear(dim, dim)})
        self.target = copy.deepcopy(self.online["encoder"])
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))


@register_method
class ToyMethod(Method):
    """BYOL-like regression of the EMA target's embedding of the other view, plus InfoNCE against a queue."""

    name = "toy"
    config_class = ToyConfig
    cfg: ToyConfig
    arch: ToyArch
    calls: dict[str, int]

    def build(self) -> ToyArch:
        self.calls = {"monitor": 0, "after_step": 0}
        return ToyArch(self.cfg.toy.dim, self.cfg.toy.queue_size)

    def parts(self) -> list[Part]:
        online = self.arch.online
        return [Part("encoder", online["encoder"], "trained"), Part("predictor", online["predictor"], "trained"),
                Part("target", self.arch.target, "ema", ema_of="encoder")]

    def views(self, crops: MultiCropConfig) -> Views:
        return Views(crops=dataclasses.replace(crops, n_local=0), patch_size=7)

    def param_groups(self) -> list[dict[str, Any]]:
        return build_param_groups(self.arch.online, self.cfg.optim)

    def clip_modules(self) -> dict[str, nn.Module]:
        return dict(self.arch.online.named_children())

    def compute_losses(self, batch: dict[str, Any], values: ScheduleValues) -> LossOutput:
        arch = self.arch
        v1, v2 = batch["global_crops"].chunk(2)
        pred = F.normalize(arch.online["predictor"](arch.online["encoder"](torch.cat([v1, v2]))), dim=1)
        with torch.no_grad():
            keys = F.normalize(arch.target(torch.cat([v2, v1])), dim=1)
        regression = (2 - 2 * (pred * keys).sum(1)).mean()
        logits = torch.cat([(pred * keys).sum(1, keepdim=True), pred @ arch.queue.T], dim=1) / values.teacher_temp
        nce = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
        total = regression + 0.5 * nce
        self._keys = keys
        return total, {"losses": {"regression": regression.detach(), "nce": nce.detach(), "total": total.detach()},
                       "extras": {"pred": pred.detach()}}

    def after_step(self, values: ScheduleValues) -> None:
        super().after_step(values)  # the declared EMA: target <- m * target + (1 - m) * encoder
        with torch.no_grad():  # then the queue: this step's keys replace the oldest ones
            arch, n = self.arch, len(self._keys)
            idx = (arch.queue_ptr + torch.arange(n)) % len(arch.queue)
            arch.queue[idx] = self._keys
            arch.queue_ptr.copy_((arch.queue_ptr + n) % len(arch.queue))
        self.calls["after_step"] += 1

    def monitor(self, out: dict[str, Any]) -> dict[str, float]:
        self.calls["monitor"] += 1
        return {"pred_std": float(out["extras"]["pred"].std(0).mean())}

    def flops_per_sample(self, batch: dict[str, Any]) -> float:
        d = self.cfg.toy.dim
        return 2 * 3 * 2 * (147 * d + d * d)

    def export(self, out: Path, *, is_main: bool) -> None:
        target = full_state_dict(self.arch.target)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(target, out / "toy_target.pth")


TOY_RECIPE = """
name = "toy"
method = "toy"

[toy]
dim = 8
queue_size = 10

[data.shards]
urls = ["{urls}"]
batch_size = 4
num_workers = 0
shuffle_buffer = 8

[data.crops]
global_size = 28
local_size = 14
n_local = 2

[schedule]
epoch_length = 2
epochs = 3
warmup_epochs = 1
base_lr = 0.05
lr_reference_batch = 4
momentum_teacher = 0.9
teacher_temp = 0.2
warmup_teacher_temp = 0.1
warmup_teacher_temp_epochs = 1
freeze_last_layer_epochs = 0

[train]
precision = "fp32"
log_every = 1
monitor_every = 2
checkpoint_every = 100
keep_last = 2
tensorboard = false
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=48, per_shard=16)


@pytest.fixture
def toy_recipe(tmp_path, shards) -> str:
    path = tmp_path / "toy.toml"
    path.write_text(TOY_RECIPE.format(urls=shards))
    return str(path)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- registry
def test_registry_and_recipes_select_their_method():
    assert get_method("dinov2") is DINOv2Method and get_method("distill") is DistillMethod
    assert METHODS["toy"] is ToyMethod
    with pytest.raises(ValueError, match=r"method 'mocov9' is unknown; known: .*dinov2.*distill"):
        get_method("mocov9")
    # one field picks the method; a recipe without it is DINOv2 (all recipes written before methods existed)
    assert type(load_config(TrainConfig, str(RECIPES / "tiny_cpu.toml"))) is DINOv2Config
    assert type(load_config(TrainConfig, str(RECIPES / "tiny_cpu.toml"), ['method="dinov2"'])) is DINOv2Config
    distill = load_config(TrainConfig, str(RECIPES / "distill_tiny_cpu.toml"))
    assert type(distill) is DistillConfig and distill.method == "distill" and distill.students
    with pytest.raises(ValueError, match="method 'mocov9' is unknown"):
        load_config(TrainConfig, str(RECIPES / "tiny_cpu.toml"), ['method="mocov9"'])
    with pytest.raises(ValueError, match="method: 'dinov2' is configured by DINOv2Config, not DistillConfig"):
        load_config(DistillConfig, str(RECIPES / "distill_tiny_cpu.toml"), ['method="dinov2"'])
    with pytest.raises(ValueError, match="unknown config field.*teacher"):  # DINOv2 has no teacher section
        load_config(TrainConfig, str(RECIPES / "distill_tiny_cpu.toml"), ['method="dinov2"'])

    class Impostor(ToyMethod):
        pass

    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_method(Impostor)
    assert METHODS["toy"] is ToyMethod
    with pytest.raises(ValueError, match="kind"):
        Part("x", nn.Linear(1, 1), "momentum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ema_of"):
        Part("x", nn.Linear(1, 1), "ema")


def test_toy_config_parses_and_validates(toy_recipe):
    cfg = load_config(TrainConfig, toy_recipe)
    assert type(cfg) is ToyConfig and cfg.toy.queue_size == 10 and cfg.data.crops.global_size == 28
    with pytest.raises(ValueError, match="toy.dim"):
        load_config(TrainConfig, toy_recipe, ["toy.dim=0"])
    with pytest.raises(ValueError, match="data.masking"):  # the shared data section has no masking
        load_config(TrainConfig, toy_recipe, ["data.masking.mask_probability=0.5"])


# ---------------------------------------------------------------------------------------------- the toy trains
def test_toy_method_trains_and_resumes_bitwise_with_the_unchanged_trainer(tmp_path, toy_recipe):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([toy_recipe, "--out", str(straight)]) == 0
    assert main([toy_recipe, "--out", str(resumed), "--set", "train.stop_at=3"]) == 0  # killed mid-epoch
    assert not (resumed / "export").exists()
    ckpt = dcp_to_state_dict(resumed / "checkpoints")
    assert {"model.queue", "model.queue_ptr", "model.target.3.weight"} <= set(ckpt)  # queue and EMA checkpointed
    assert int(ckpt["model.queue_ptr"]) == (3 * 8) % 10  # 3 steps of 8 keys
    assert main([toy_recipe, "--out", str(resumed)]) == 0
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "regression", "nce", "lr", "momentum", "teacher_temp", "grad_norm/encoder",
                    "grad_norm/predictor"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    assert [("pred_std" in m) for m in a] == [False, True] * 3  # the method's monitor, every 2nd step
    assert a[0]["loss"] != a[-1]["loss"] and all(m["grad_norm/encoder"] > 0 for m in a)
    ta = torch.load(straight / "export" / "toy_target.pth", weights_only=True)
    tb = torch.load(resumed / "export" / "toy_target.pth", weights_only=True)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert "method = \"toy\"" in (straight / "config.toml").read_text()


def test_toy_step_applies_the_protocol_hooks(tmp_path, toy_recipe):
    trainer = Trainer(load_config(TrainConfig, toy_recipe), tmp_path / "run")
    method = trainer.method
    assert isinstance(method, ToyMethod) and trainer.arch is method.arch
    assert not any(p.requires_grad for p in method.arch.target.parameters())  # the EMA part gets no gradients
    owned = {id(p) for p in method.arch.online.parameters()}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == owned
    batch = next(iter(trainer.make_loader(trainer.phases[0])))
    assert batch["global_crops"].shape == (8, 3, 28, 28)
    local = batch.get("local_crops")
    assert local is None or local.numel() == 0  # the method's views: no local crops (the recipe asks for 2)
    target = [p.clone() for p in method.arch.target.parameters()]
    queue = method.arch.queue.clone()
    metrics = trainer.train_step(batch, 0, trainer.phases[0])
    m = trainer.phases[0].schedules.at(0).momentum
    for t0, t1, s in zip(target, method.arch.target.parameters(), method.arch.online["encoder"].parameters()):
        torch.testing.assert_close(t1, m * t0 + (1 - m) * s.detach())
    assert not torch.equal(queue, method.arch.queue) and int(method.arch.queue_ptr) == 8
    assert method.calls == {"monitor": 0, "after_step": 1} and metrics["mfu"] is None  # no peak FLOPs on CPU
    assert not method.arch.target.training and method.arch.online.training
    # the non-finite guard is the Trainer's: a NaN batch is skipped without touching the EMA or the queue
    queue = method.arch.queue.clone()
    batch["global_crops"][0, 0, 0, 0] = float("nan")
    assert trainer.train_step(batch, 1, trainer.phases[0]) is None
    assert torch.equal(queue, method.arch.queue) and method.calls["after_step"] == 1
