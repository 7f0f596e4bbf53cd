"""DINOv3's high-resolution adaptation: crop sizes drawn per batch, and the Gram teacher fed the global crops
rendered at a multiple of their size (its patch features resized to the student's grid)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.data.augment import MultiCropConfig
from pretrain.data.loader import WdsLoader
from pretrain.data.wds import WdsConfig
from pretrain.losses.gram import gram_loss
from pretrain.ssl.meta_arch import resize_patch_grid
from pretrain.train import TrainConfig, Trainer, main, plan_phases
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .test_train import PARITY, _shard_batch, _synthetic_batches
from .trainer_utils import tiny_overrides, write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
RECIPE = str(RECIPES / "tiny_cpu.toml")
GRAM = {"loss.gram_weight": "1.0", "loss.gram_start": "0", "loss.gram_refresh_every": "100"}
#: a 2-iteration main phase, then 4 iterations with mixed sizes and a 2x Gram teacher
ADAPT = {"schedule.epochs": "1", "schedule.warmup_epochs": "0", "schedule.freeze_last_layer_epochs": "0",
         "schedule.warmup_teacher_temp_epochs": "0", "phases": '[{name = "hires_adapt", iters = 4, global_size = 28, '
         'global_sizes = [28, 42], local_sizes = [14, 21], gram_upscale = 2}]'}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


def _sizes(loader: WdsLoader, n: int) -> list[tuple[int, int, int]]:
    out = []
    for batch, _ in zip(loader, range(n)):
        g, loc = batch["global_crops"], batch["local_crops"]
        assert batch["masks"].shape[1] == (g.shape[-1] // 7) ** 2  # masks on the batch's own grid
        out.append((g.shape[-1], loc.shape[-1], g.shape[0]))
    return out


def test_batches_draw_their_sizes_from_the_choices_the_same_way_every_time(shards):
    crops = MultiCropConfig(global_size=28, local_size=14, n_local=2, global_size_choices=(28, 42),
                            local_size_choices=(14, 21))
    cfg = WdsConfig(urls=[shards], batch_size=4, num_workers=0, shuffle_buffer=8)
    first = _sizes(WdsLoader(cfg, crops, patch_size=7, rank=0, world_size=1), 10)
    again = _sizes(WdsLoader(cfg, crops, patch_size=7, rank=0, world_size=1), 10)
    other_rank = _sizes(WdsLoader(cfg, crops, patch_size=7, rank=1, world_size=2), 10)
    assert first == again
    assert [s[:2] for s in other_rank] == [s[:2] for s in first]  # every rank draws the same sizes per step
    assert {s[0] for s in first} == {28, 42} and {s[1] for s in first} == {14, 21}
    fixed = dataclasses.replace(crops, global_size_choices=(), local_size_choices=())
    assert {s[:2] for s in _sizes(WdsLoader(cfg, fixed, patch_size=7, rank=0, world_size=1), 4)} == {(28, 14)}
    assert crops.min_decode_side > fixed.min_decode_side  # decoding keeps enough pixels for the largest choice
    with pytest.raises(ValueError, match="global_size_choices"):
        MultiCropConfig(global_size_choices=(0, 28))


def test_phase_settings_reach_the_crops_and_errors_name_the_field():
    cfg = load_config(TrainConfig, str(RECIPES / "tiny_cpu_gram.toml"))
    adapt = plan_phases(cfg, world_size=1)[2]
    assert adapt.name == "hires_adapt" and adapt.crops.global_size_choices == (56, 84)
    assert adapt.crops.local_size_choices == (14, 28) and adapt.crops.hires_factor == 2
    large = plan_phases(load_config(TrainConfig, str(RECIPES / "vitl14_gram.toml")), world_size=8)[2]
    assert large.crops.global_size_choices == (518, 770) and large.crops.local_size_choices == (98, 168, 224, 336)
    assert all(v % 14 == 0 for v in large.crops.global_size_choices + large.crops.local_size_choices)
    for field, value in (("gram_upscale", "0"), ("global_sizes", "[]")):
        with pytest.raises(ValueError, match=f"phases.{field}"):
            load_config(TrainConfig, RECIPE, [f'phases=[{{iters = 4, global_size = 28, {field} = {value}}}]'])


def test_resized_patch_grid_keeps_constant_and_smooth_features():
    const = torch.full((2, 64, 5), 3.0)  # an 8 x 8 grid of 56 px images (patch 7) to 4 x 4 (28 px)
    torch.testing.assert_close(resize_patch_grid(const, (56, 56), (28, 28)), torch.full((2, 16, 5), 3.0))
    ramp = torch.arange(8.0).repeat(8).view(1, 64, 1)  # value = column index
    out = resize_patch_grid(ramp, (56, 56), (28, 28)).view(4, 4)
    assert torch.allclose(out, out[0].expand(4, 4)) and bool((out[0].diff() > 0).all())  # still a column ramp
    rect = resize_patch_grid(torch.randn(1, 8 * 12, 3), (56, 84), (28, 42))
    assert rect.shape == (1, 4 * 6, 3)


def test_gram_teacher_sees_the_high_resolution_crops_and_the_student_a_downscaled_copy(tmp_path, shards):
    overrides = tiny_overrides(shards, **{**PARITY, **GRAM, **ADAPT, "loss.koleo_weight": "0.0"})
    trainer = Trainer(load_config(TrainConfig, RECIPE, overrides), tmp_path / "t")
    method, arch, adapt = trainer.method, trainer.method.arch, trainer.phases[1]
    views = method.views(adapt.crops)
    assert views.crops.global_size == 56 and views.crops.global_size_choices == (56, 84)
    assert views.patch_size == 14 and views.crops.hires_factor == 1  # the masks stay on the student's 7 px grid
    batch = _shard_batch(next(_synthetic_batches(1)), 0, 1)
    hires = F.interpolate(batch["global_crops"], scale_factor=2, mode="bilinear") + 0.1 * torch.randn(8, 3, 56, 56)
    loss, out = method.compute_losses({**batch, "global_crops": hires}, adapt.schedules.at(adapt.start))
    with torch.no_grad():
        small = F.interpolate(hires, size=(28, 28), mode="bicubic", antialias=True)
        student = arch.student["backbone"].forward_features(small, masks=batch["masks"])["x_norm_patchtokens"]
        teacher = arch.gram_teacher["backbone"].forward_features(hires)["x_norm_patchtokens"]  # 8 x 8 grid
        grid = teacher.transpose(1, 2).reshape(8, -1, 8, 8)
        target = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)
        want = gram_loss(student, target, arch.loss_cfg.gram_clamp)
    assert float(out["losses"]["gram"]) == pytest.approx(float(want), rel=1e-5)
    # without the high-resolution phase the same batch at 28 px gives another Gram target
    method.views(trainer.phases[0].crops)
    _, plain = method.compute_losses({**batch, "global_crops": small}, adapt.schedules.at(adapt.start))
    assert float(plain["losses"]["gram"]) != pytest.approx(float(want), rel=1e-3)
    # the DINO / iBOT part of the loss saw exactly the downscaled crops
    assert float(plain["losses"]["dino"]) == pytest.approx(float(out["losses"]["dino"]), rel=1e-5)


def test_gram_upscale_needs_gram_anchoring(tmp_path, shards):
    overrides = tiny_overrides(shards, **ADAPT)
    with pytest.raises(ValueError, match="loss.gram_weight"):
        Trainer(load_config(TrainConfig, RECIPE, overrides), tmp_path / "t").fit()


def _adapt_run(rank: int, world: int, urls: str, out: str) -> list[dict]:
    main([RECIPE, "--out", out, *[a for kv in tiny_overrides(
        urls, **{**PARITY, **GRAM, **ADAPT, "data.shards.batch_size": 4 // world, "loss.koleo_weight": "0.0",
                 "train.checkpoint_every": "100"}) for a in ("--set", kv)]])
    if rank != 0:
        return []
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_adaptation_phase_trains_on_one_and_two_processes(tmp_path, shards):
    one = _adapt_run(0, 1, shards, str(tmp_path / "one"))
    two = run_distributed(_adapt_run, shards, str(tmp_path / "two"), world_size=2, timeout_s=300, init=False)[0]
    assert [m["step"] for m in one] == [1, 2, 3, 4, 5, 6] == [m["step"] for m in two]
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["gram"]) for m in one + two)
    # both ran the main phase at 28 px, then the adaptation phase with sizes drawn per batch (the global crops as
    # loaded: rendered at 2x for the Gram teacher), the same draws on 1 and 2 processes
    assert [m["phase"] for m in one] == [0, 0, 1, 1, 1, 1] == [m["phase"] for m in two]
    sizes = [m["crop_px"] for m in one]
    assert sizes[:2] == [28, 28] and set(sizes[2:]) <= {56, 84} and sizes == [m["crop_px"] for m in two]
