"""SimCLR v1/v2 on the method protocol: the loss against a float64 loop, LARS against a hand-computed step, finite
extreme logits, SimCLR's augmentation, 2 gloo processes equal 1 (global BN, gathered negatives, LARS on FSDP2
shards), bitwise resume, the v2 fine-tuning export, and a short Fashion-MNIST run that learns."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import TrainConfig
from pretrain.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment, MultiCropConfig
from pretrain.eval.config import KnnConfig
from pretrain.eval.fashion_mnist import load_fashion_mnist
from pretrain.eval.knn import knn_predict
from pretrain.layers.global_bn import GlobalBatchNorm, convert_global_bn
from pretrain.methods import SimCLRConfig, SimCLRMethod
from pretrain.methods.simclr import build_finetune_start, simclr_crops
from pretrain.optim import ScheduleValues
from pretrain.optim_lars import LARS
from pretrain.train import Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "simclr_tiny_cpu.toml")
VALUES = ScheduleValues(lr=0.1, last_layer_lr=0.1, weight_decay=0.0, momentum=0.0, teacher_temp=0.1)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine oversubscribed threads make a step 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=256, per_shard=64)


def _sets(urls: str, **extra: object) -> list[str]:
    sets = {"data.shards.urls": f'["{urls}"]', "data.shards.batch_size": 8, "data.shards.num_workers": 0,
            "data.shards.shuffle_buffer": 16, "simclr.backbone": '"resnet_test"', "schedule.epoch_length": 2,
            "schedule.epochs": 3, "schedule.warmup_epochs": 1, "train.log_every": 1, "train.monitor_every": 2,
            "train.checkpoint_every": 100}
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def _method(**extra: object) -> SimCLRMethod:
    torch.manual_seed(0)
    cfg = load_config(TrainConfig, TINY, _sets("/nonexistent-{0..1}.tar", **extra))
    method = SimCLRMethod(cfg)
    method.setup(torch.device("cpu"))
    method.train_mode()
    return method


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_parse_with_the_papers_settings():
    v1 = load_config(TrainConfig, str(RECIPES / "simclr_v1_resnet50.toml"))
    v2 = load_config(TrainConfig, str(RECIPES / "simclr_v2_resnet50.toml"))
    tiny = load_config(TrainConfig, TINY)
    assert type(v1) is type(v2) is type(tiny) is SimCLRConfig
    assert (v1.simclr.version, v2.simclr.version, tiny.simclr.version) == (1, 2, 1)
    for cfg in (v1, v2):
        assert cfg.data.shards.batch_size * 32 == 4096 and cfg.schedule.lr_reference_batch == 4096
        assert cfg.simclr.optimizer == "lars" and cfg.simclr.trust_coefficient == 0.001 and cfg.simclr.global_bn
        assert cfg.simclr.temperature == 0.1 and cfg.simclr.backbone == "resnet50" and cfg.optim.clip_grad == 0
    assert v1.schedule.base_lr == pytest.approx(0.3 * 4096 / 256) and v1.schedule.weight_decay == 1e-6
    assert v1.schedule.warmup_epochs == 10 and v1.schedule.min_lr == 0
    assert v2.schedule.base_lr == pytest.approx(0.1 * math.sqrt(4096)) and v2.schedule.weight_decay == 1e-4
    assert v2.schedule.warmup_epochs == 0.05 * v2.schedule.epochs
    assert tiny.simclr.backbone == "resnet18_small" and tiny.data.crops.global_size == 28
    with pytest.raises(ValueError, match="simclr.version"):
        load_config(TrainConfig, TINY, ["simclr.version=3"])
    with pytest.raises(ValueError, match="simclr.backbone"):
        load_config(TrainConfig, TINY, ['simclr.backbone="vits14"'])


def test_augmentation_is_simclrs():
    s = load_config(TrainConfig, str(RECIPES / "simclr_v1_resnet50.toml")).simclr
    c = simclr_crops(MultiCropConfig(global_size=32), s)
    assert (c.n_local, c.global_scale, c.jitter_p, c.grayscale_p, c.solarize_p) == (0, (0.08, 1.0), 0.8, 0.2, 0.0)
    assert (c.brightness, c.contrast, c.saturation, c.hue) == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert c.blur_probabilities == (0.5, 0.5, 0.5) and c.flip_p == 0.5
    aug, rng = MultiCropAugment(c), np.random.default_rng(0)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    ops = [op for _ in range(300) for op in aug(img, rng, return_ops=True)["ops"]]
    assert len(ops) == 600 and {op.kind for op in ops} == {"global1", "global2"} and not any(op.solarize for op in ops)
    rates = [np.mean([bool(op.jitter) for op in ops]), np.mean([op.grayscale for op in ops]),
             np.mean([op.blur_sigma is not None for op in ops]), np.mean([op.flip for op in ops])]
    np.testing.assert_allclose(rates, [0.8, 0.2, 0.5, 0.5], atol=0.06)
    areas = [op.box[2] * op.box[3] / 48**2 for op in ops]
    assert min(areas) < 0.15 and max(areas) > 0.9


# ---------------------------------------------------------------------------------------------- the loss
def _nt_xent_loop(z: np.ndarray, t: float) -> float:
    """NT-Xent over 2N views written as the paper's sum: view k's partner is k +- N, every other view a negative."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("version", [1, 2])
def test_loss_equals_a_float64_loop_over_the_model(version):
    method = _method(**{"simclr.version": version, "simclr.temperature": 0.2})
    heads = [m for m in method.arch["head"].modules() if isinstance(m, torch.nn.Linear)]
    assert len(heads) == 1 + version and all(m.bias is None for m in heads)  # 2- (v1) / 3-layer (v2) MLP
    assert all(isinstance(m, GlobalBatchNorm) for m in method.arch.modules() if "BatchNorm" in type(m).__name__)
    crops = torch.randn(12, 3, 28, 28, generator=torch.Generator().manual_seed(0))  # 6 images x 2 views
    ref = copy.deepcopy(method.arch).double().train()
    z64 = ref["head"](ref["backbone"](crops.double())).detach().numpy()
    loss, out = method.compute_losses({"global_crops": crops}, VALUES)
    assert float(loss.detach()) == pytest.approx(_nt_xent_loop(z64, 0.2), abs=1e-5)
    assert float(out["losses"]["total"]) == float(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.arch.parameters())
    # swapping the views of one image changes nothing; pairing view 1 of image 0 with view 2 of image 1 does
    swapped = crops.clone()
    swapped[[0, 6]] = crops[[6, 0]]
    assert float(method.compute_losses({"global_crops": swapped}, VALUES)[0]) == pytest.approx(float(loss), abs=1e-5)
    mispaired = crops.clone()
    mispaired[[6, 7]] = crops[[7, 6]]
    assert abs(float(method.compute_losses({"global_crops": mispaired}, VALUES)[0]) - float(loss)) > 1e-3


def test_extreme_logits_stay_finite():
    method = _method(**{"simclr.temperature": 1e-4})
    crops = torch.randn(8, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 1e3
    crops[4:] = crops[:4]  # identical views: positive logits at 1 / T = 1e4
    loss, _ = method.compute_losses({"global_crops": crops}, VALUES)
    loss.backward()
    assert math.isfinite(float(loss)) and all(torch.isfinite(p.grad).all() for p in method.arch.parameters())


def test_global_bn_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        for m in bn:
            m.weight.uniform_(0.5, 2.0), m.bias.normal_()
    gbn = convert_global_bn(copy.deepcopy(bn))
    assert all(isinstance(m, GlobalBatchNorm) for m in gbn) and gbn.state_dict().keys() == bn.state_dict().keys()
    for _ in range(2):
        x = (torch.randn(6, 4, 5, 5) * 3 + 1).requires_grad_()
        outs = []
        for net in (bn, gbn):
            x.grad = None
            y = net[0](x)
            z = net[1](y.mean((2, 3)))
            (y.square().mean() + z.pow(3).mean()).backward()
            outs.append((y, z, x.grad.clone(), [p.grad.clone() for p in net.parameters()]))
        (y0, z0, gx0, gp0), (y1, z1, gx1, gp1) = outs
        torch.testing.assert_close(y1, y0), torch.testing.assert_close(z1, z0), torch.testing.assert_close(gx1, gx0)
        for a, b in zip(gp1, gp0):
            torch.testing.assert_close(a, b)
        bn.zero_grad(), gbn.zero_grad()
    for (k, a), b in zip(bn.state_dict().items(), gbn.state_dict().values()):  # running statistics
        torch.testing.assert_close(b, a, msg=k)
    bn.eval(), gbn.eval()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(gbn[0](x), bn[0](x))


# ---------------------------------------------------------------------------------------------- LARS
def test_lars_step_equals_the_hand_computed_update():
    w = torch.nn.Parameter(torch.tensor([[3.0, -4.0], [0.0, 0.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    z = torch.nn.Parameter(torch.zeros(2, 2))  # ||w|| = 0: trust ratio 1
    opt = LARS([{"params": [w, z], "lars": True, "weight_decay": 0.1},
                {"params": [b], "lars": False, "weight_decay": 0.0}], lr=2.0, momentum=0.9, trust_coefficient=1e-3)
    gw, gb, gz = torch.tensor([[0.5, 0.0], [0.0, -1.0]]), torch.tensor([0.25, -0.5]), torch.tensor([[1.0, 1.0]] * 2)
    vw, vz, vb = 0.0, 0.0, 0.0
    ww, bb, zz = w.detach().double().clone(), b.detach().double().clone(), z.detach().double().clone()
    for _ in range(2):
        w.grad, b.grad, z.grad = gw.clone(), gb.clone(), gz.clone()
        opt.step()
        g = gw.double() + 0.1 * ww  # decayed gradient, then the trust ratio on it
        ratio = 1e-3 * ww.norm() / g.norm()
        vw = 0.9 * vw + 2.0 * ratio * g
        ww = ww - vw
        gzz = gz.double() + 0.1 * zz
        ratio_z = 1e-3 * zz.norm() / gzz.norm() if zz.norm() > 0 else 1.0
        vz = 0.9 * vz + 2.0 * ratio_z * gzz
        zz = zz - vz
        vb = 0.9 * vb + 2.0 * gb.double()  # excluded: no decay, no adaptation
        bb = bb - vb
        torch.testing.assert_close(w.detach().double(), ww, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(z.detach().double(), zz, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.detach().double(), bb, rtol=1e-6, atol=1e-7)
    assert not torch.equal(zz, torch.zeros(2, 2, dtype=torch.float64))


def test_param_groups_exclude_biases_and_bn_from_lars_and_decay():
    method = _method()
    groups = method.param_groups()
    opt = method.build_optimizer(groups)
    assert isinstance(opt, LARS)
    names = {id(p): n for n, p in method.arch.named_parameters()}
    plain = [names[id(p)] for g in opt.param_groups if not g["lars"] for p in g["params"]]
    adapted = [names[id(p)] for g in opt.param_groups if g["lars"] for p in g["params"]]
    assert plain and all(".bn" in n or "downsample.1" in n or n.endswith(("bias", ".1.weight")) for n in plain)
    assert all(n.endswith("weight") and "bn" not in n for n in adapted) and "backbone.conv1.weight" in adapted
    assert {g["wd_multiplier"] for g in opt.param_groups if not g["lars"]} == {0.0}
    assert len(plain) + len(adapted) == len(names)


# ---------------------------------------------------------------------------------------------- distributed
def _batches(n_steps: int, images: int = 4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2 * images, 3, 28, 28, generator=g) for _ in range(n_steps)]


def _parity_run(rank: int, world: int, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    torch.set_num_threads(1)
    sets = _sets("/nonexistent-{0..1}.tar", **{"data.shards.batch_size": 4 // world, "schedule.warmup_epochs": 0,
                                                "schedule.base_lr": 0.3})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), out)
    phase, losses = trainer.phases[0], []
    for step, crops in enumerate(_batches(3)):
        views = crops.reshape(2, 4, *crops.shape[1:])[:, rank * 4 // world:(rank + 1) * 4 // world]
        losses.append(trainer.train_step({"global_crops": views.reshape(-1, *crops.shape[1:])}, step, phase)["loss"])
    state = full_state_dict(trainer.arch)
    return {"losses": losses, "state": {k: v.numpy().copy() for k, v in state.items()} if rank == 0 else None}


def test_two_processes_equal_one(tmp_path):
    single = _parity_run(0, 1, str(tmp_path / "one"))
    ranks = run_distributed(_parity_run, str(tmp_path / "two"), world_size=2, timeout_s=300)
    np.testing.assert_allclose(np.mean([r["losses"] for r in ranks], axis=0), single["losses"], atol=1e-5, rtol=0)
    assert single["losses"][0] != single["losses"][2]
    for k, v in single["state"].items():  # weights, running statistics of the global BNs
        np.testing.assert_allclose(ranks[0]["state"][k], v, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------------------------- resume, export
def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bitwise_and_v2_exports_its_finetuning_start(tmp_path, shards):
    sets = _sets(shards, **{"simclr.version": 2})
    args = [TINY, *[a for s in sets for a in ("--set", s)]]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*args, "--out", str(straight)]) == 0
    assert main([*args, "--out", str(resumed), "--set", "train.stop_at=3"]) == 0
    assert main([*args, "--out", str(resumed)]) == 0
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "lr", "grad_norm/backbone", "grad_norm/head"):
            assert ma[key] == mb[key], (ma["step"], key)
    assert a[0]["loss"] != a[-1]["loss"] and "pos_cos" in a[1]
    for name in ("backbone.pth", "projection_head.pth", "finetune_head_layer.pth"):
        sa, sb = (torch.load(d / "export" / name, weights_only=True) for d in (straight, resumed))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    # the fine-tuning start is the backbone + the first projection layer of the trained model
    model = build_finetune_start(straight / "export").eval()
    trainer = Trainer(load_config(TrainConfig, TINY, sets), straight)
    assert trainer.resume() == 6
    arch = trainer.arch.eval()
    x = torch.randn(4, 3, 28, 28)
    torch.testing.assert_close(model(x), arch["head"][0](arch["backbone"](x)))
    assert json.loads((straight / "export" / "backbone.pth.json").read_text())["version"] == 2


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
                            "schedule.base_lr": 2.0, "train.log_every": 5})
    cfg = load_config(TrainConfig, TINY, sets)
    trainer = Trainer(cfg, tmp_path / "run")
    random_init = copy.deepcopy(trainer.arch["backbone"])
    assert trainer.fit() == 60
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.2, losses
    before, after = _knn(random_init), _knn(trainer.arch["backbone"])
    print(f"k-NN@20 random init {before:.3f}, after 60 SimCLR steps {after:.3f}")
    assert after > before + 0.02, (before, after)
