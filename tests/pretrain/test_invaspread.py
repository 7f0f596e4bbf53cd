"""InvaSpread (``method = "invaspread"``): the loss against a float64 loop through the encoder, finite extremes,
2 gloo processes against 1, bitwise resume with the export, and a Fashion-MNIST run beating random init on k-NN."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.methods.invaspread import InvaSpreadConfig, InvaSpreadMethod
from pretrain.optim import Schedules, ScheduleValues
from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .method_utils import read_metrics, slice_views
from .test_simclr import _knn
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "invaspread_tiny_cpu.toml")
VALUES = ScheduleValues(lr=0.1, last_layer_lr=0.1, weight_decay=0.0, momentum=0.9, teacher_temp=0.1)
SMALL = {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "invaspread.dim": "16"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


def _sets(urls: str = "/nonexistent-{0..0}.tar", **extra: object) -> list[str]:
    sets = {"data.shards.urls": f'["{urls}"]', "data.shards.batch_size": "4", "data.shards.num_workers": "0",
            "data.shards.shuffle_buffer": "8", "schedule.epoch_length": "2", "schedule.epochs": "3",
            "schedule.lr_milestones": "[]", "schedule.warmup_epochs": "0", "schedule.lr_reference_batch": "4",
            "train.log_every": "1", "train.monitor_every": "2", "train.checkpoint_every": "2",
            "train.tensorboard": "false", **SMALL}
    sets.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in sets.items()]


def _method(**extra: object) -> InvaSpreadMethod:
    torch.manual_seed(0)
    method = InvaSpreadMethod(load_config(TrainConfig, TINY, _sets(**extra)))
    method.setup(torch.device("cpu"))
    return method


_metrics = read_metrics


def test_recipes_parse_with_the_released_settings():
    cfg = load_config(TrainConfig, str(RECIPES / "invaspread_resnet18_cifar.toml"))
    assert type(cfg) is InvaSpreadConfig and cfg.backbone.name == "resnet18_small"
    s = cfg.invaspread
    assert (s.dim, s.temperature, s.detach_candidates, s.sgd_momentum) == (128, 0.1, True, 0.9)
    assert cfg.data.shards.batch_size == cfg.schedule.lr_reference_batch == 128 and cfg.data.crops.global_size == 32
    assert cfg.schedule.weight_decay == 5e-4 and cfg.schedule.epochs == 301 and cfg.train.optimizer == "sgd"
    sched, e = Schedules(cfg.schedule, 128), cfg.schedule.epoch_length
    assert [sched.at(i * e).lr for i in (0, 119, 120, 300)] == pytest.approx([0.03, 0.03, 3e-3, 3e-3])
    c = cfg.data.crops
    assert c.global_scale == (0.2, 1.0) and c.jitter_p == 1.0 and c.hue == 0.4 and c.grayscale_p == 0.2
    assert type(load_config(TrainConfig, TINY)) is InvaSpreadConfig
    for field, value in (("invaspread.temperature", "0"), ("invaspread.dim", "0")):
        with pytest.raises(ValueError, match=field):
            load_config(TrainConfig, TINY, [f"{field}={value}"])


def test_loss_equals_a_float64_loop_through_the_encoder():
    method = _method()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 28, 28, generator=g)
    ref = copy.deepcopy(method.arch).double().train()
    loss, out = method.compute_losses({"global_crops": x}, VALUES)
    with torch.no_grad():
        z = ref["head"](ref["backbone"](x.double()))  # one forward over both views (BN statistics of all 8)
    v = z / z.norm(dim=1, keepdim=True)
    n, want = 4, 0.0
    for i in range(8):
        partner = (i + n) % 8
        e = {j: math.exp(float(v[i] @ v[j]) / 0.1) for j in range(8) if j != i}
        s = sum(e.values())
        want -= math.log(e[partner] / s) + sum(math.log(1 - e[j] / s) for j in e if j != partner)
    assert float(loss) == pytest.approx(want / 8, rel=1e-5) and float(loss) > 0
    assert set(out["extras"]) == {"z1", "z2"}


def test_extreme_logits_stay_finite():
    method = _method(**{"invaspread.temperature": "1e-4"})
    with torch.no_grad():
        for p in method.arch.parameters():
            p.mul_(1e3)
    for x in (1e6 * torch.randn(8, 3, 28, 28), torch.ones(8, 3, 28, 28)):  # huge; all views identical
        method.arch.zero_grad()
        loss, _ = method.compute_losses({"global_crops": x}, VALUES)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in method.arch.parameters() if p.grad is not None)


def _batches(n_steps: int, b: int = 8):
    g = torch.Generator().manual_seed(0)
    return [{"global_crops": torch.randn(2 * b, 3, 28, 28, generator=g)} for _ in range(n_steps)]


_slice = slice_views


def _parity_run(rank: int, world: int, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    # a ViT backbone: per-sample features, so per-rank batches give the single-process numbers (a ResNet's BN would
    # use per-rank statistics, as in the released code, which has no global BN)
    sets = _sets(**{"data.shards.batch_size": 8 // world, "schedule.base_lr": "0.5", "backbone.name": '"vit_test"',
                    "backbone.overrides": "{patch_size = 7, img_size = 28}"})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), out)
    phase = trainer.phases[0]
    losses = [trainer.train_step(_slice(b, rank, world), step, phase)["loss"] for step, b in enumerate(_batches(3))]
    sd = full_state_dict(trainer.method.arch)
    return {"losses": losses, "model": {k: v.numpy().copy() for k, v in sd.items()} if rank == 0 else None}


def test_two_processes_equal_one(tmp_path):
    one = _parity_run(0, 1, str(tmp_path / "one"))
    two = run_distributed(_parity_run, str(tmp_path / "two"), world_size=2, timeout_s=300)
    np.testing.assert_allclose(np.mean([r["losses"] for r in two], axis=0), one["losses"], atol=1e-5, rtol=0)
    assert one["losses"][0] != one["losses"][2]
    for k, v in one["model"].items():
        np.testing.assert_allclose(two[0]["model"][k], v, atol=1e-5, err_msg=k)


def _train(out: Path, urls: str, **extra: object) -> int:
    return main([TINY, "--out", str(out), *[a for kv in _sets(urls, **extra) for a in ("--set", kv)]])


def test_resume_is_bitwise_and_exports(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, shards)
    _train(resumed, shards, **{"train.stop_at": 3})
    _train(resumed, shards)
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "lr", "grad_norm/encoder"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    for name in ("backbone.pth", "embedding_head.pth"):
        sa, sb = (torch.load(d / "export" / name, weights_only=True) for d in (straight, resumed))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert set(torch.load(straight / "export" / "embedding_head.pth", weights_only=True)) == {"weight", "bias"}
    assert "pos_cos" in a[1] and "feat_std" in a[1]


def test_fashion_mnist_run_lowers_the_loss_and_beats_random_init_on_knn(tmp_path):
    """200 steps of 32 images (the tiny recipe's lr 0.1 at batch 32) on 512 Fashion-MNIST images."""
    shards = write_shards(tmp_path / "shards", n=512, per_shard=128)
    sets = _sets(shards, **{"data.shards.batch_size": 32, "schedule.epoch_length": 20, "schedule.epochs": 10,
                            "schedule.base_lr": 0.1, "schedule.lr_reference_batch": 32, "train.log_every": 5,
                            "train.checkpoint_every": 1000, "invaspread.dim": 128})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), tmp_path / "run")
    random_init = copy.deepcopy(trainer.arch["backbone"])
    assert trainer.fit() == 200
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    before, after = _knn(random_init), _knn(trainer.arch["backbone"])
    print(f"losses {[round(x, 3) for x in losses]}; k-NN@20 random init {before:.3f}, after 200 steps {after:.3f}")
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    assert after > before + 0.03, (before, after)
