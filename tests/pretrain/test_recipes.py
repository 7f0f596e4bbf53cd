"""Every shipped pretraining recipe parses into a validated TrainConfig with the official hyper-parameters."""

from pathlib import Path

import pytest
import tomllib

from pretrain.train import TrainConfig, plan_phases
from pretrain.utils.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "pretrain" / "recipes").glob("*.toml"))
# DINOv2 pretraining recipes; other methods' recipes are checked by their own tests (tests/pretrain/test_<method>.py)
TRAIN_RECIPES = [r for r in RECIPES if tomllib.loads(r.read_text()).get("method", "dinov2") == "dinov2"]
METHOD_RECIPES = [r for r in RECIPES if r not in TRAIN_RECIPES]


def test_every_method_has_a_full_scale_and_a_tiny_cpu_recipe_that_parse():
    by_method: dict[str, list[str]] = {}
    for recipe in METHOD_RECIPES:
        cfg = load_config(TrainConfig, str(recipe))
        assert cfg.method == tomllib.loads(recipe.read_text())["method"] and type(cfg) is not TrainConfig, recipe
        by_method.setdefault(cfg.method, []).append(recipe.stem)
    assert set(by_method) >= {"distill", "simclr", "moco", "mocov3", "instdisc", "invaspread", "cpc", "cmc"}
    for method, names in by_method.items():
        assert any(n.endswith("_tiny_cpu") for n in names) and any(not n.endswith("_tiny_cpu") for n in names), (
            method, names)


def test_recipes_exist():
    names = {r.stem for r in TRAIN_RECIPES}
    assert {"vits14", "vitb14", "vitl14", "vitg14", "tiny_cpu"} <= names


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_with_highres_phase(recipe):
    cfg = load_config(TrainConfig, str(recipe))
    phases = plan_phases(cfg, world_size=8)
    if tomllib.loads(recipe.read_text()).get("phases") == []:  # native-resolution recipes say so explicitly
        assert [p.name for p in phases] == ["main"] and cfg.data.crops.global_size == cfg.backbone.overrides[
            "img_size"]
        return
    assert len(phases) >= 2 and phases[1].name == "highres"
    assert all(p.name == "hires_adapt" and p.crops.hires_factor == 2 for p in phases[2:])
    assert phases[1].start == cfg.schedule.total_iters


@pytest.mark.parametrize("name", ["vitl14", "vitg14"])
def test_large_recipes_use_official_settings(name):
    path = next(r for r in TRAIN_RECIPES if r.stem == name)
    cfg = load_config(TrainConfig, str(path))
    assert cfg.loss.centering == "sinkhorn" and cfg.heads.separate_ibot_head
    assert cfg.heads.out_dim == cfg.heads.ibot_out_dim == 131072 and cfg.heads.bottleneck_dim == 384
    assert cfg.backbone.drop_path_rate == 0.4 and cfg.optim.layerwise_decay == 1.0
    assert cfg.schedule.total_iters == 625_000 and cfg.schedule.warmup_iters == 100_000
    assert cfg.schedule.weight_decay_end == 0.2 and cfg.schedule.momentum_teacher == 0.994
    assert cfg.phases[0].iters == 10_000 and cfg.phases[0].global_size == 518


def test_overrides_apply_and_errors_name_the_field():
    path = str(next(r for r in TRAIN_RECIPES if r.stem == "vits14"))
    cfg = load_config(TrainConfig, path, ["schedule.base_lr=1e-3", 'data.shards.urls=["/tmp/x-{0..1}.tar"]'])
    assert cfg.schedule.base_lr == 1e-3 and cfg.data.shards.urls == ["/tmp/x-{0..1}.tar"]
    with pytest.raises(ValueError, match="train.precision"):
        load_config(TrainConfig, path, ['train.precision="fp8"'])
    with pytest.raises(ValueError, match="schedule.bogus"):
        load_config(TrainConfig, path, ["schedule.bogus=1"])
