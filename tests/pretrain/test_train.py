"""The training loop: exact resume, the high-resolution phase, export, and FSDP parity across process counts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.masking import mask_batch, sample_masks
from pretrain.models import build_backbone
from pretrain.train import TrainConfig, Trainer, main, plan_phases
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .trainer_utils import tiny_overrides, write_shards

RECIPE = str(Path(__file__).resolve().parents[2] / "pretrain" / "recipes" / "tiny_cpu.toml")
HIGHRES = '[{name = "highres", iters = 2, global_size = 42, local_size = 14, base_lr = 0.002}]'


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=96, per_shard=32)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(out: Path, urls: str, **extra) -> int:
    return main([RECIPE, "--out", str(out), *[a for kv in tiny_overrides(urls, **extra) for a in ("--set", kv)]])


def test_resume_is_bitwise_and_highres_phase_runs(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, shards, phases=HIGHRES)
    _run(resumed, shards, phases=HIGHRES, **{"train.stop_at": 3})  # killed inside the main phase
    assert not (resumed / "export").exists()
    _run(resumed, shards, phases=HIGHRES, **{"train.stop_at": 7})  # crosses the phase boundary, stops inside
    _run(resumed, shards, phases=HIGHRES)
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 9)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "dino", "ibot", "koleo", "lr", "teacher_temp", "grad_norm/backbone"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    assert [m["phase"] for m in a] == [0] * 6 + [1] * 2
    # Schedules restart compressed in the phase (2/6 of a 2-iteration warm-up rounds to none) at the lower base lr.
    peak = 0.002 * (4 / 1024) ** 0.5
    assert a[6]["lr"] == pytest.approx(peak) and max(m["lr"] for m in a[:6]) > 1.5 * peak
    assert a[0]["teacher_temp"] == pytest.approx(0.04) and a[5]["teacher_temp"] == pytest.approx(0.07)
    # The teacher export is identical and loads as an official-layout backbone.
    ta = torch.load(straight / "export" / "teacher.pth", weights_only=True)
    tb = torch.load(resumed / "export" / "teacher.pth", weights_only=True)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    model = build_backbone(None, weights=str(straight / "export" / "teacher.pth"))
    assert model.patch_size == 7 and not any(k.startswith("backbone.") for k in ta)
    heads = torch.load(straight / "export" / "teacher_heads.pth", weights_only=True)
    assert "dino_head.last_layer.weight_v" in heads["heads"] and "dino_center" in heads["centers"]
    ckpts = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert ckpts == ["step-7", "step-8"]  # keep_last=2 (7: the stop inside the high-res phase)
    assert "[backbone]" in (straight / "config.toml").read_text()


def test_phase_plan_compresses_schedules(shards):
    cfg = load_config(TrainConfig, RECIPE, tiny_overrides(shards, phases=HIGHRES))
    main_phase, hr = plan_phases(cfg, world_size=1)
    assert (main_phase.start, main_phase.end, hr.start, hr.end) == (0, 6, 6, 8)
    assert hr.crops.global_size == 42 and main_phase.crops.global_size == 28
    assert hr.schedules.peak_lr == pytest.approx(0.002 * (4 / 1024) ** 0.5)


def test_non_finite_steps_are_skipped_then_fatal(tmp_path, shards):
    cfg = load_config(TrainConfig, RECIPE, tiny_overrides(shards, **{"train.max_bad_steps": 2}))
    trainer = Trainer(cfg, tmp_path / "run")
    batch = next(iter(trainer.make_loader(trainer.phases[0])))
    before = [p.clone() for p in trainer.arch.student.parameters()]
    batch["global_crops"][0, 0, 0, 0] = float("nan")
    assert trainer.train_step(batch, 0, trainer.phases[0]) is None
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.arch.student.parameters()))
    with pytest.raises(RuntimeError, match=r"2 consecutive non-finite steps .* rank\(s\) \[0\]"):
        trainer.train_step(batch, 1, trainer.phases[0])


# ---------------------------------------------------------------------------------------------- distributed
def _synthetic_batches(n_steps: int, b: int = 4):
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(n_steps):
        masks = sample_masks(2 * b, (4, 4), generator=rng)
        yield {"global_crops": torch.randn(2 * b, 3, 28, 28, generator=g),
               "local_crops": torch.randn(2 * b, 3, 14, 14, generator=g), "masks": masks}


def _shard_batch(batch: dict, rank: int, world: int) -> dict:
    out = {}
    for key in ("global_crops", "local_crops", "masks"):
        x = batch[key]
        views = x.reshape(2, x.shape[0] // 2, *x.shape[1:])  # crop-major: (views, B, ...)
        per = views.shape[1] // world
        out[key] = views[:, rank * per:(rank + 1) * per].reshape(-1, *x.shape[1:])
    mb = mask_batch(out["masks"], upperbound=out["masks"].numel())
    out.update(mask_indices=mb.mask_indices, masks_weight=mb.masks_weight)
    return out


PARITY = {"train.optimizer": '"sgd"', "backbone.drop_path_rate": "0.0", "loss.koleo_distributed": "true",
          "schedule.warmup_epochs": "0", "schedule.freeze_last_layer_epochs": "0", "schedule.base_lr": "2.0"}


def _parity_run(rank: int, world: int, urls: str, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    # The same global batch of 4: the per-rank batch size sets the lr scaling (sqrt of the global batch).
    cfg = load_config(TrainConfig, RECIPE, tiny_overrides(urls, **PARITY, **{"data.shards.batch_size": 4 // world}))
    trainer = Trainer(cfg, out)
    phase = trainer.phases[0]
    losses = []
    for step, batch in enumerate(_synthetic_batches(3)):
        metrics = trainer.train_step(_shard_batch(batch, rank, world), step, phase)
        losses.append(metrics["loss"])
    trainer.save(3, phase, None)
    student = full_state_dict(trainer.arch.student)
    # numpy, not tensors: torch would share tensor storage with the parent through the exiting child's fds
    return {"losses": losses, "student": {k: v.numpy().copy() for k, v in student.items()} if rank == 0 else None}


def test_fsdp_two_processes_equal_one_and_checkpoint_reshards(tmp_path, shards):
    single = _parity_run(0, 1, shards, str(tmp_path / "one"))
    ranks = run_distributed(_parity_run, shards, str(tmp_path / "two"), world_size=2, timeout_s=300)
    two_losses = np.mean([r["losses"] for r in ranks], axis=0)
    np.testing.assert_allclose(two_losses, single["losses"], atol=1e-5, rtol=0)
    assert single["losses"][0] != single["losses"][2]  # the steps changed the model
    for k, v in single["student"].items():
        np.testing.assert_allclose(ranks[0]["student"][k], v, atol=1e-5, err_msg=k)
    # The 2-process checkpoint resumes in 1 process with the same weights.
    cfg = load_config(TrainConfig, RECIPE, tiny_overrides(shards, **PARITY, **{"data.shards.batch_size": 2}))
    trainer = Trainer(cfg, tmp_path / "two")
    assert trainer.resume() == 3
    resumed = trainer.arch.student.state_dict()
    for k, v in ranks[0]["student"].items():
        np.testing.assert_array_equal(resumed[k].numpy(), v, err_msg=k)
