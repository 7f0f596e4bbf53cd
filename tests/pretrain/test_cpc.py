"""CPC v2 (``method = "cpc"``): recipes, the loss against a float64 loop over predictions and candidates, finite
extreme logits, the causal context network, the per-patch augmentation, 2 gloo processes against 1, bitwise
resume with the layer-norm encoder's export, and a short Fashion-MNIST run that learns."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.checkpoint import dcp_to_state_dict
from pretrain.config import TrainConfig
from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD
from pretrain.eval.config import KnnConfig
from pretrain.eval.fashion_mnist import load_fashion_mnist
from pretrain.eval.knn import knn_predict
from pretrain.methods.cpc import (
    CausalContext,
    CPCConfig,
    CPCMethod,
    augment_patches,
    cut_patches,
    draw_patch_ops,
    patch_grid_features,
)
from pretrain.models import build_backbone
from pretrain.optim import Schedules, ScheduleValues
from pretrain.train import Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "cpc_tiny_cpu.toml")
FULL = str(RECIPES / "cpc_v2_resnet.toml")
VALUES = ScheduleValues(lr=0.1, last_layer_lr=0.1, weight_decay=0.0, momentum=0.0, teacher_temp=0.1)
SMALL = {"cpc.backbone": '"resnet_test"', "cpc.backbone_overrides": "{}", "cpc.context_dim": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine oversubscribed threads make a step much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=256, per_shard=64)


def _sets(urls: str = "/nonexistent-{0..1}.tar", **extra: object) -> list[str]:
    """Overrides making the tiny recipe a seconds-long run (batch 4, 6 steps, a 64-d ResNet-18)."""
    sets = {"data.shards.urls": f'["{urls}"]', "data.shards.batch_size": 4, "data.shards.num_workers": 0,
            "data.shards.shuffle_buffer": 16, "schedule.epoch_length": 2, "schedule.epochs": 3,
            "schedule.warmup_epochs": 0, "schedule.lr_reference_batch": 4, "train.log_every": 1,
            "train.monitor_every": 2, "train.checkpoint_every": 2, **SMALL}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def _method(**extra: object) -> CPCMethod:
    torch.manual_seed(0)
    method = CPCMethod(load_config(TrainConfig, TINY, _sets(**extra)))
    method.setup(torch.device("cpu"))
    method.train_mode()
    return method


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_parse_with_the_papers_settings():
    full, tiny = load_config(TrainConfig, FULL), load_config(TrainConfig, TINY)
    assert type(full) is type(tiny) is CPCConfig
    c = full.cpc
    assert (c.backbone, c.norm, c.grid, c.patch_size, c.stride) == ("resnet101", "layernorm", 7, 64, 32)
    assert c.crop_size == 256 == full.data.crops.global_size and full.data.crops.n_local == 0
    assert c.offsets == [1, 2, 3, 4, 5] and c.directions == 2 and c.temperature == 1.0
    assert (c.color_drop_p, c.flip_p, c.jitter) == (1.0, 0.5, 4)
    assert full.train.optimizer == "adamw" and full.optim.betas == (0.9, 0.999)
    assert full.data.shards.batch_size * 32 == 512 == full.schedule.lr_reference_batch
    assert Schedules(full.schedule, 512).at(0).lr == pytest.approx(2e-4) and full.schedule.epochs == 200
    assert (tiny.cpc.backbone, tiny.cpc.grid, tiny.cpc.patch_size, tiny.cpc.stride) == ("resnet18_small", 3, 14, 7)
    assert tiny.cpc.crop_size == 28 == tiny.data.crops.global_size and tiny.cpc.offsets == [1, 2]
    bad = {"cpc.norm": '"batch"', "cpc.directions": 3, "cpc.steps": 3, "cpc.jitter": 14, "cpc.temperature": 0,
           "cpc.kernel_size": 2, "cpc.backbone": '"vits14"', "cpc.color_drop_p": 1.5}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_config(TrainConfig, TINY, [f"{key}={value}"])
    with pytest.raises(ValueError, match=r"cpc\.grid, cpc\.patch_size and cpc\.stride cover 30 px"):
        load_config(TrainConfig, TINY, ["cpc.patch_size=16"])
    # the patch encoder: per-patch layer norm (GroupNorm with one group) in every norm, no batch norm
    norms = [m for m in _method().arch.backbone.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 20 and all(m.num_groups == 1 for m in norms)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in _method().arch.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in _method(**{"cpc.norm": '"bn"'}).arch.modules())


# ---------------------------------------------------------------------------------------------- the loss
def _unorient(t: torch.Tensor, d: int) -> torch.Tensor:
    """Back from the oriented grid: identity, vertical flip, transpose, flip then transpose."""
    return [t, t.flip(-2), t.transpose(-2, -1), t.flip(-2).transpose(-2, -1)][d]


TARGET = [lambda r, c, k: (r + k, c), lambda r, c, k: (r - k, c), lambda r, c, k: (r, c + k),
          lambda r, c, k: (r, c - k)]  # top-down, bottom-up, left-right, right-left


def test_loss_equals_a_float64_loop_over_predictions_and_candidates():
    method = _method(**{"cpc.directions": 4, "cpc.color_drop_p": 0, "cpc.flip_p": 0})
    crops = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(0))  # 4 images x 2 crops
    loss, out = method.compute_losses({"global_crops": crops}, VALUES)
    ref = copy.deepcopy(method.arch).double()
    x, g, p, s = crops[:4].double(), 3, 14, 7
    keys = [(b, r, c) for b in range(4) for r in range(g) for c in range(g)]
    z = {key: ref.backbone(x[key[0]:key[0] + 1, :, key[1] * s:key[1] * s + p, key[2] * s:key[2] * s + p])[0]
         for key in keys}  # every patch encoded alone
    grid = torch.stack([torch.stack([torch.stack([z[b, r, c] for c in range(g)], -1) for r in range(g)], -2)
                        for b in range(4)])  # (B, D, G, G)
    terms = []
    with torch.no_grad():
        for d in range(4):
            ctx = _unorient(ref.head.context(grid, d), d)  # context at original positions
            for ki, k in enumerate((1, 2)):
                w, per = ref.head.predictors[d][ki].weight, []
                for b, r, c in keys:
                    tr, tc = TARGET[d](r, c, k)
                    if not (0 <= tr < g and 0 <= tc < g):
                        continue
                    pred = w @ ctx[b, :, r, c]
                    scores = [float(pred @ z[key]) for key in keys]
                    top = max(scores)
                    lse = top + math.log(sum(math.exp(v - top) for v in scores))
                    per.append(lse - scores[keys.index((b, tr, tc))])
                assert len(per) == 4 * g * (g - k)
                terms.append(sum(per) / len(per))
    expected = sum(terms) / len(terms)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5) and expected > 0
    assert 0.0 <= float(out["extras"]["acc"]) <= 1.0 and float(out["losses"]["total"]) == float(loss.detach())
    loss.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in method.arch.parameters())
    # only the first crop of each image is used
    other = crops.clone()
    other[4:] = torch.randn(4, 3, 28, 28)
    assert float(method.compute_losses({"global_crops": other}, VALUES)[0]) == float(loss)


def test_extreme_logits_stay_finite():
    method = _method(**{"cpc.temperature": 1e-4})
    with torch.no_grad():
        for pred in method.arch.head.predictors.parameters():
            pred.mul_(1e4)
    crops = 1e6 * torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    crops[1:4] = crops[0]  # identical images: positives tie with negatives of other images
    loss, _ = method.compute_losses({"global_crops": crops}, VALUES)
    loss.backward()
    assert math.isfinite(float(loss)) and float(loss) > 1.0
    assert all(torch.isfinite(q.grad).all() for q in method.arch.parameters() if q.grad is not None)


# ---------------------------------------------------------------------------------------------- causality
def test_context_is_causal_top_down_and_bottom_up():
    torch.manual_seed(0)
    net = CausalContext(8, 12, blocks=3, k=3)
    z = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        base = net(z)
        for i in range(5):
            moved = z.clone()
            moved[:, :, i + 1:] += 100 * torch.randn_like(moved[:, :, i + 1:])
            c = net(moved)
            assert torch.equal(c[:, :, : i + 1], base[:, :, : i + 1]), i  # rows <= i see nothing below them
            if i < 4:
                assert not torch.allclose(c[:, :, i + 1], base[:, :, i + 1])
            row = z.clone()
            row[:, :, i] += 1.0
            assert not torch.allclose(net(row)[:, :, i], base[:, :, i])  # c_i sees row i itself
    # the method's head: the bottom-up context of original row r sees only rows >= r; predictions too
    head = _method(**{"cpc.directions": 4}).arch.head
    z = torch.randn(2, 64, 3, 3)
    with torch.no_grad():
        up = head.context(z, 1).flip(-2)  # back to original rows
        moved = z.clone()
        moved[:, :, 0] += 50.0
        assert torch.equal(head.context(moved, 1).flip(-2)[:, :, 1:], up[:, :, 1:])
        assert not torch.allclose(head.context(moved, 1).flip(-2)[:, :, 0], up[:, :, 0])
        left = head.context(z, 2).transpose(-2, -1)  # left-right: column c sees columns <= c
        moved = z.clone()
        moved[:, :, :, 2] -= 50.0
        assert torch.equal(head.context(moved, 2).transpose(-2, -1)[:, :, :, :2], left[:, :, :, :2])
    zg = z.clone().requires_grad_()
    pred = head(zg)[0][0]  # top-down, k = 1: (B, 2, 3, D) from context rows 0 and 1
    (grad,) = torch.autograd.grad(pred[:, 0].sum(), zg)
    assert grad[:, :, 1:].abs().max() == 0 and grad[:, :, 0].abs().max() > 0


# ---------------------------------------------------------------------------------------------- augmentation
def test_patch_augmentation_is_per_patch_deterministic_and_split_invariant():
    x = torch.rand(8, 3, 28, 28) + 0.5  # no zeros
    patches = cut_patches(x, 3, 14, 7)
    assert patches.shape == (8, 9, 3, 14, 14) and torch.equal(patches[2, 5], x[2, :, 7:21, 14:28])
    ops = draw_patch_ops(0, 5, range(8), 9, 3, jitter=4)
    half = draw_patch_ops(0, 5, range(4, 8), 9, 3, jitter=4)  # rank 1 of 2: global samples 4..7
    assert all(torch.equal(ops[k][4:], half[k]) for k in ops)
    assert not torch.equal(draw_patch_ops(0, 6, range(8), 9, 3, jitter=4)["flip_u"], ops["flip_u"])
    dropped = augment_patches(patches, ops, color_drop_p=1.0, flip_p=0.0, jitter=0)
    alive = dropped.flatten(3).abs().sum(-1) > 0  # (B, n, C)
    assert torch.equal(alive.sum(-1), torch.ones(8, 9, dtype=torch.long))  # two of the three channels dropped
    assert torch.equal(alive.float().argmax(-1), ops["keep"])
    flipped = augment_patches(patches, ops, color_drop_p=0.0, flip_p=1.0, jitter=0)
    assert torch.equal(flipped, patches.flip(-1))
    many = draw_patch_ops(3, 0, range(200), 49, 3, jitter=4)
    assert abs(float((many["flip_u"] < 0.5).float().mean()) - 0.5) < 0.02
    assert set(many["keep"].unique().tolist()) == {0, 1, 2} and set(many["shift"].unique().tolist()) == set(range(5))
    jittered = augment_patches(patches, ops, color_drop_p=0.0, flip_p=0.0, jitter=4)
    for b, n in ((0, 0), (3, 4), (7, 8)):  # a 10 px sub-crop at (oy, ox) moved to (2, 2), zeros around it
        oy, ox = ops["shift"][b, n].tolist()
        expected = torch.zeros(3, 14, 14)
        expected[:, 2:12, 2:12] = patches[b, n, :, oy:oy + 10, ox:ox + 10]
        assert torch.equal(jittered[b, n], expected)
    # in the method: keyed by the step counter, which after_step advances (and a checkpoint holds)
    method = _method()
    crops = torch.randn(8, 3, 28, 28)
    first = float(method.compute_losses({"global_crops": crops}, VALUES)[0])
    assert float(method.compute_losses({"global_crops": crops}, VALUES)[0]) == first
    method.after_step(VALUES)
    assert int(method.arch.steps) == 1 and float(method.compute_losses({"global_crops": crops}, VALUES)[0]) != first
    feats = patch_grid_features(method.arch.backbone.eval(), crops[:2], 3, 14, 7)
    assert feats.shape == (2, 64)


# ---------------------------------------------------------------------------------------------- distributed
def _batches(n_steps: int, images: int = 8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2 * images, 3, 28, 28, generator=g) for _ in range(n_steps)]


def _parity_run(rank: int, world: int, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    torch.set_num_threads(1)
    sets = _sets(**{"data.shards.batch_size": 8 // world, "schedule.lr_reference_batch": 8,
                    "schedule.base_lr": 0.05, "train.optimizer": '"sgd"', "cpc.jitter": 2})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), out)
    phase, losses = trainer.phases[0], []
    per = 8 // world
    for step, crops in enumerate(_batches(3)):
        views = crops.reshape(2, 8, *crops.shape[1:])[:, rank * per:(rank + 1) * per]
        losses.append(trainer.train_step({"global_crops": views.reshape(-1, *crops.shape[1:])}, step, phase)["loss"])
    state = full_state_dict(trainer.arch)
    return {"losses": losses, "state": {k: v.numpy().copy() for k, v in state.items()} if rank == 0 else None}


def test_two_processes_equal_one(tmp_path):
    single = _parity_run(0, 1, str(tmp_path / "one"))
    ranks = run_distributed(_parity_run, str(tmp_path / "two"), world_size=2, timeout_s=300)
    np.testing.assert_allclose(np.mean([r["losses"] for r in ranks], axis=0), single["losses"], atol=1e-5, rtol=0)
    assert single["losses"][0] != single["losses"][2]
    assert abs(ranks[0]["losses"][0] - ranks[1]["losses"][0]) > 1e-4  # each rank has its own share of the loss
    assert int(single["state"]["steps"]) == 3
    for k, v in single["state"].items():
        np.testing.assert_allclose(ranks[0]["state"][k], v, atol=1e-5, err_msg=k)
    moved = single["state"]["head.predictors.0.0.weight"] - _method().arch.head.predictors[0][0].weight.detach().numpy()
    assert np.abs(moved).max() > 1e-4  # the compared parameters did train


# ---------------------------------------------------------------------------------------------- resume, export
def test_resume_is_bitwise_and_exports_the_layer_norm_encoder(tmp_path, shards):
    args = [TINY, *[a for s in _sets(shards, **{"cpc.jitter": 2}) for a in ("--set", s)]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*args, "--out", str(straight)]) == 0
    assert main([*args, "--out", str(resumed), "--set", "train.stop_at=3"]) == 0
    assert int(dcp_to_state_dict(resumed / "checkpoints")["model.steps"]) == 3
    assert main([*args, "--out", str(resumed)]) == 0
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "lr", "grad_norm/backbone", "grad_norm/head"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    assert a[0]["loss"] != a[-1]["loss"] and 0.0 <= a[1]["cpc_acc"] <= 1.0
    sa, sb = dcp_to_state_dict(straight / "checkpoints"), dcp_to_state_dict(resumed / "checkpoints")
    model = [k for k in sa if k.startswith("model.")]
    assert {"model.steps", "model.head.contexts.1.blocks.0.conv.weight", "model.backbone.bn1.weight"} <= set(model)
    assert all(torch.equal(sa[k], sb[k]) for k in model)
    export = straight / "export" / "backbone.pth"
    meta = json.loads(export.with_name("backbone.pth.json").read_text())
    assert meta["config"]["norm"] == "layernorm" and meta["method"] == "cpc" and meta["grid"] == 3
    backbone = build_backbone(None, weights=str(export)).eval()
    assert all(torch.equal(v, sa[f"model.backbone.{k}"]) for k, v in backbone.state_dict().items())
    assert isinstance(backbone.bn1, torch.nn.GroupNorm) and backbone(torch.randn(2, 3, 28, 28)).shape == (2, 64)


# ---------------------------------------------------------------------------------------------- it learns
def _features(backbone: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = torch.from_numpy(images).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    with torch.no_grad():
        return torch.cat([backbone((xb - mean) / std) for xb in ((x[i:i + 256]) for i in range(0, len(x), 256))])


def _knn(backbone: torch.nn.Module) -> float:
    xtr, ytr = load_fashion_mnist("train", 2000)
    xte, yte = load_fashion_mnist("test", 1000)
    pred = knn_predict(_features(backbone.eval(), xtr), torch.as_tensor(ytr), _features(backbone, xte),
                       KnnConfig(ks=[20]), num_classes=10, device="cpu")[20]
    return float((pred[:, 0] == torch.as_tensor(yte)).float().mean())


def test_fashion_mnist_run_lowers_the_loss_and_beats_random_init_on_knn(tmp_path, shards):
    sets = _sets(shards, **{"data.shards.batch_size": 32, "schedule.epoch_length": 20, "schedule.epochs": 3,
                            "schedule.lr_reference_batch": 32, "schedule.base_lr": 5e-3, "train.log_every": 1,
                            "train.checkpoint_every": 100, "cpc.context_dim": 32})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), tmp_path / "run")
    random_init = copy.deepcopy(trainer.arch.backbone)
    assert trainer.fit() == 60
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    before, after = _knn(random_init), _knn(trainer.arch.backbone)
    print(f"CPC loss {first:.3f} -> {last:.3f}; k-NN@20 random init {before:.3f}, after 60 CPC steps {after:.3f}")
    assert last < first - 0.15, (first, last)  # seen: 5.716 -> 5.458 (chance: log(32 x 9) = 5.66)
    assert after > before + 0.03, (before, after)  # seen: 0.644 -> 0.706
