"""SimSiam (``method = "simsiam"``): the recipes, the loss against a float64 reference through the networks, finite
extremes, the predictor's fixed lr against the encoder's cosine decay, 2 gloo processes against 1, bitwise resume
with the export, the collapse monitor, and a Fashion-MNIST run beating random init on k-NN."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.layers.global_bn import GlobalBatchNorm
from pretrain.methods.simsiam import SimSiamConfig, SimSiamMethod
from pretrain.optim import Schedules, ScheduleValues
from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .method_utils import fast_sets, read_metrics, slice_views
from .test_simclr import _knn
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "simsiam_tiny_cpu.toml")
VALUES = ScheduleValues(lr=0.1, last_layer_lr=0.1, weight_decay=0.0, momentum=0.9, teacher_temp=0.1)
SMALL = {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "simsiam.dim": "16", "simsiam.pred_dim": "8"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine oversubscribed threads make a step much slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


def _sets(urls: str = "/nonexistent-{0..0}.tar", **extra: object) -> list[str]:
    return fast_sets(urls, SMALL, **extra)


def _method(**extra: object) -> SimSiamMethod:
    torch.manual_seed(0)
    method = SimSiamMethod(load_config(TrainConfig, TINY, _sets(**extra)))
    method.setup(torch.device("cpu"))
    method.train_mode()
    return method


_metrics = read_metrics


def test_recipes_parse_with_the_papers_settings():
    cfg = load_config(TrainConfig, str(RECIPES / "simsiam_resnet50.toml"))
    assert type(cfg) is SimSiamConfig and cfg.backbone.name == "resnet50"
    s = cfg.simsiam
    assert (s.dim, s.hidden_dim, s.pred_dim, s.fix_pred_lr, s.global_bn, s.sgd_momentum) == (2048, 0, 512, True,
                                                                                             True, 0.9)
    sc = cfg.schedule
    assert cfg.data.shards.batch_size * 8 == sc.lr_reference_batch == 512 and cfg.train.optimizer == "sgd"
    assert sc.base_lr == pytest.approx(0.05 * 512 / 256) and sc.weight_decay == sc.weight_decay_end == 1e-4
    assert (sc.epochs, sc.warmup_epochs, sc.min_lr) == (100, 0, 0.0)
    sched = Schedules(sc, 512)
    assert sched.at(0).lr == pytest.approx(0.1) and sched.at(sc.total_iters // 2).lr == pytest.approx(0.05, rel=1e-3)
    c = cfg.data.crops
    assert (c.global_scale, c.jitter_p, c.brightness, c.contrast, c.saturation, c.hue) == ((0.2, 1.0), 0.8, 0.4,
                                                                                          0.4, 0.4, 0.1)
    assert (c.grayscale_p, c.blur_probabilities[:2], c.solarize_p, c.flip_p, c.n_local) == (0.2, (0.5, 0.5), 0.0,
                                                                                           0.5, 0)
    tiny = load_config(TrainConfig, TINY)
    assert type(tiny) is SimSiamConfig and tiny.backbone.name == "resnet18_small" and tiny.data.shards.batch_size == 32
    for field, value in (("simsiam.dim", "0"), ("simsiam.pred_dim", "0"), ("simsiam.hidden_dim", "-1"),
                         ("simsiam.sgd_momentum", "1.0")):
        with pytest.raises(ValueError, match=field):
            load_config(TrainConfig, TINY, [f"{field}={value}"])


def test_networks_have_the_papers_shape():
    method = SimSiamMethod(load_config(TrainConfig, str(RECIPES / "simsiam_resnet50.toml")))
    arch = method.build()
    proj, pred = arch["encoder"]["projector"], arch["predictor"]
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linears] == [(2048, 2048, None)] * 3
    bns = [m for m in proj if isinstance(m, GlobalBatchNorm)]
    assert len(bns) == 3 and [m.affine for m in bns] == [True, True, False]
    assert sum(isinstance(m, torch.nn.ReLU) for m in proj) == 2 and isinstance(proj[-1], GlobalBatchNorm)
    assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (2048, 512, 2048)
    assert isinstance(pred[1], GlobalBatchNorm) and pred[3].bias is not None and isinstance(pred[-1], torch.nn.Linear)


def test_loss_equals_a_float64_reference():
    method = _method()
    arch = method.arch
    x = torch.randn(12, 3, 28, 28, generator=torch.Generator().manual_seed(1))  # 6 images x 2 views
    ref = copy.deepcopy(arch).double().train()
    loss, out = method.compute_losses({"global_crops": x}, VALUES)
    with torch.no_grad():
        z = [ref["encoder"]["projector"](ref["encoder"]["backbone"](v)).numpy() for v in x.double().chunk(2)]
        p = [ref["predictor"](torch.from_numpy(zi)).numpy() for zi in z]
    want = 0.0
    for a, b in ((p[0], z[1]), (p[1], z[0])):
        for i in range(6):
            want -= 0.5 * float(a[i] @ b[i]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[i])) / 6
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6) and -1 <= float(loss.detach()) <= 1
    # stop-gradient: the loss's gradient equals that of D(p1, z2.detach()) / 2 + D(p2, z1.detach()) / 2 only
    loss.backward()
    g = arch["encoder"]["backbone"].conv1.weight.grad.clone()
    arch.zero_grad()
    enc, v1, v2 = arch["encoder"], *x.chunk(2)
    z1, z2 = (enc["projector"](enc["backbone"](v)) for v in (v1, v2))
    with_grad = -0.5 * (torch.cosine_similarity(arch["predictor"](z1), z2, dim=1).mean()
                        + torch.cosine_similarity(arch["predictor"](z2), z1, dim=1).mean())
    with_grad.backward()
    assert not torch.allclose(arch["encoder"]["backbone"].conv1.weight.grad, g)  # the stop-gradient matters
    assert set(out["extras"]) == {"z", "p"}


def test_extreme_inputs_stay_finite():
    method = _method()
    with torch.no_grad():
        for p in method.arch.parameters():
            p.mul_(1e3)
    for x in (1e6 * torch.randn(8, 3, 28, 28), torch.ones(8, 3, 28, 28), torch.zeros(8, 3, 28, 28)):
        method.arch.zero_grad()
        loss, _ = method.compute_losses({"global_crops": x}, VALUES)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in method.arch.parameters() if p.grad is not None)


def test_predictor_lr_is_fixed_while_the_encoders_decays(tmp_path):
    sets = _sets(**{"schedule.epochs": "5", "schedule.warmup_epochs": "1", "schedule.base_lr": "0.2"})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), tmp_path / "run")
    groups = trainer.optimizer.param_groups
    assert [g["fix_lr"] for g in groups] == [False, True] and isinstance(trainer.optimizer, torch.optim.SGD)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in trainer.arch["predictor"].parameters()}
    phase, total = trainer.phases[0], 10
    x = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    enc, pred = [], []
    for step in range(total):
        trainer.train_step({"global_crops": x}, step, phase)
        enc.append(groups[0]["lr"])
        pred.append(groups[1]["lr"])
    assert pred == [0.2] * total and groups[1]["weight_decay"] == groups[0]["weight_decay"] == 1e-4
    want = [0.2 * i if i < 2 else 0.1 * (1 + math.cos(math.pi * (i - 2) / 8)) for i in range(total)]  # warm-up, cosine
    assert enc == pytest.approx(want) and enc[0] == 0.0 and max(enc) == pytest.approx(0.2) and enc[-1] < 0.02
    unfixed = Trainer(load_config(TrainConfig, TINY, [*sets, "simsiam.fix_pred_lr=false"]), tmp_path / "unfixed")
    unfixed.train_step({"global_crops": x}, 5, unfixed.phases[0])
    assert [g["lr"] for g in unfixed.optimizer.param_groups] == pytest.approx([want[5]] * 2)


def _batches(n_steps: int, b: int = 8):
    g = torch.Generator().manual_seed(0)
    return [{"global_crops": torch.randn(2 * b, 3, 28, 28, generator=g)} for _ in range(n_steps)]


_slice = slice_views


# per-sample backbone features (a ResNet's global BN gives the same numbers at step 0, but its few-sample
# statistics amplify the 1e-6 summation-order differences of the two runs beyond 1e-5 within 3 steps)
VIT = {"backbone.name": '"vit_test"', "backbone.overrides": "{patch_size = 7, img_size = 28, init_values = 0}"}


def _parity_run(rank: int, world: int, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    sets = _sets(**{"data.shards.batch_size": 8 // world, "schedule.base_lr": "0.05",
                    **VIT})
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
        for key in ("loss", "lr", "grad_norm/encoder", "grad_norm/predictor"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    for name in ("backbone.pth", "projector.pth"):
        sa, sb = (torch.load(d / "export" / name, weights_only=True) for d in (straight, resumed))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert "6.weight" in torch.load(straight / "export" / "projector.pth", weights_only=True)
    assert 0 < a[1]["z_std"] <= 2 and "pz_cos" in a[1]


def test_collapse_monitor_reads_one_when_spread_and_zero_when_collapsed():
    method = _method()
    z = torch.randn(4096, 64, generator=torch.Generator().manual_seed(4))
    spread = method.monitor({"extras": {"z": z, "p": z}})
    collapsed = method.monitor({"extras": {"z": z[:1].expand(64, -1) + 1e-6 * z[:64], "p": z[:64]}})
    assert spread["z_std"] == pytest.approx(1.0, abs=0.02) and spread["pz_cos"] == pytest.approx(1.0)
    assert collapsed["z_std"] < 1e-4


def test_fashion_mnist_run_lowers_the_loss_and_beats_random_init_on_knn(tmp_path):
    """200 steps of 32 images (the tiny recipe: lr 0.3) on 512 Fashion-MNIST images; measured k-NN@20 0.633 -> 0.677
    (lr 0.1: 0.597, below random init after 200 steps)."""
    shards = write_shards(tmp_path / "shards", n=512, per_shard=128)
    sets = _sets(shards, **{"data.shards.batch_size": 32, "schedule.epoch_length": 20, "schedule.epochs": 10,
                            "schedule.lr_reference_batch": 32, "schedule.base_lr": 0.3, "train.log_every": 5,
                            "train.checkpoint_every": 1000, "simsiam.dim": 128, "simsiam.pred_dim": 32})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), tmp_path / "run")
    random_init = copy.deepcopy(trainer.arch["encoder"]["backbone"])
    assert trainer.fit() == 200
    metrics = _metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics]
    before, after = _knn(random_init), _knn(trainer.arch["encoder"]["backbone"])
    print(f"losses {[round(x, 3) for x in losses]}; z_std {[round(m['z_std'], 3) for m in metrics if 'z_std' in m]}; "
          f"k-NN@20 random init {before:.3f}, after 200 steps {after:.3f}")
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
    assert after > before + 0.03, (before, after)
