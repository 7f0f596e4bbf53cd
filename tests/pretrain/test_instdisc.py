"""InstDisc (``method = "instdisc"``): the NCE / softmax losses and Z against float64 references, the memory bank's
proximal update, finite extremes, 2 gloo processes against 1, bitwise resume and a Fashion-MNIST run."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.checkpoint import dcp_to_state_dict
from pretrain.methods.instdisc import InstDiscConfig, InstDiscMethod
from pretrain.optim import Schedules, ScheduleValues
from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .method_utils import read_metrics, slice_views
from .test_simclr import _knn
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "instdisc_tiny_cpu.toml")
VALUES = ScheduleValues(lr=0.1, last_layer_lr=0.1, weight_decay=0.0, momentum=0.9, teacher_temp=0.1)
SMALL = {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "instdisc.dim": "16", "instdisc.noise": "8"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


def _sets(urls: str, **extra: object) -> list[str]:
    sets = {"data.shards.urls": f'["{urls}"]', "data.shards.batch_size": "4", "data.shards.num_workers": "0",
            "data.shards.shuffle_buffer": "8", "schedule.epoch_length": "2", "schedule.epochs": "3",
            "schedule.lr_milestones": "[]", "schedule.warmup_epochs": "0", "schedule.lr_reference_batch": "4",
            "train.log_every": "1", "train.monitor_every": "2", "train.checkpoint_every": "2",
            "train.tensorboard": "false", **SMALL}
    sets.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in sets.items()]


def _method(urls: str, **extra: object) -> InstDiscMethod:
    torch.manual_seed(0)
    method = InstDiscMethod(load_config(TrainConfig, TINY, _sets(urls, **{"instdisc.loss": '"nce"', **extra})))
    method.setup(torch.device("cpu"))
    return method


def _batch(ids: list[int], seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"global_crops": torch.randn(2 * len(ids), 3, 28, 28, generator=g), "keys": [f"{i:06d}" for i in ids],
            "sets": torch.zeros(len(ids), dtype=torch.long)}


_metrics = read_metrics


def test_recipes_parse_with_the_papers_settings():
    cfg = load_config(TrainConfig, str(RECIPES / "instdisc_resnet50.toml"))
    assert type(cfg) is InstDiscConfig and cfg.backbone.name == "resnet50"
    s = cfg.instdisc
    assert (s.dim, s.temperature, s.loss, s.noise, s.bank_momentum, s.z) == (128, 0.07, "nce", 4096, 0.5, 0.0)
    assert cfg.train.optimizer == "sgd" and s.sgd_momentum == 0.9 and cfg.schedule.weight_decay == 1e-4
    assert cfg.data.shards.batch_size * 8 == cfg.schedule.lr_reference_batch == 256
    sched = Schedules(cfg.schedule, 256)
    e = cfg.schedule.epoch_length
    assert [sched.at(i * e).lr for i in (0, 119, 120, 160)] == pytest.approx([0.03, 0.03, 3e-3, 3e-4])
    c = cfg.data.crops
    assert c.global_scale == (0.2, 1.0) and c.jitter_p == 1.0 and c.hue == 0.4 and c.grayscale_p == 0.2
    assert type(load_config(TrainConfig, TINY)) is InstDiscConfig
    for field, value in (("instdisc.loss", '"bce"'), ("instdisc.temperature", "0"), ("instdisc.bank_momentum", "1")):
        with pytest.raises(ValueError, match=field):
            load_config(TrainConfig, TINY, [f"{field}={value}"])


def _reference_nce(enc, x, bank: torch.Tensor, rows, noise, t: float) -> tuple[float, float]:
    """float64 loop: Z from the noise scores, then -log h(own) - sum log(1 - h(noise)), averaged."""
    with torch.no_grad():
        f = enc["head"](enc["backbone"](x))
    f = f / f.norm(dim=1, keepdim=True)
    n, m = len(bank), noise.shape[1]
    scores = [math.exp(float(f[i] @ bank[j]) / t) for i in range(len(f)) for j in noise[i].tolist()]
    z = n * sum(scores) / len(scores)
    total = 0.0
    for i in range(len(f)):
        p = math.exp(float(f[i] @ bank[rows[i]]) / t) / z
        total -= math.log(p / (p + m / n))
        for j in noise[i].tolist():
            p = math.exp(float(f[i] @ bank[j]) / t) / z
            total -= math.log(1 - p / (p + m / n))
    return total / len(f), z


def test_nce_loss_z_and_bank_update_equal_float64_references(shards):
    method = _method(shards)
    arch = method.arch
    assert len(arch.bank) == 64 and torch.isnan(arch.log_z)
    batch = _batch([5, 0, 63, 17])
    enc = copy.deepcopy(arch.encoder).double().train()
    bank = arch.bank.vectors.double().clone()
    from pretrain.methods.instdisc import noise_rows

    noise = noise_rows(0, 0, torch.tensor([5, 0, 63, 17]), 8, 64)
    assert not (noise == torch.tensor([5, 0, 63, 17])[:, None]).any() and noise.max() <= 63
    loss, out = method.compute_losses(batch, VALUES)
    want, z = _reference_nce(enc, batch["global_crops"][:4].double(), bank, [5, 0, 63, 17], noise, 0.07)
    assert float(loss) == pytest.approx(want, rel=1e-5) and float(arch.log_z.exp()) == pytest.approx(z, rel=1e-5)
    # after the step: the proximal update of exactly the batch's rows
    f = out["extras"]["f"].double()
    method.after_step(VALUES)
    moved = 0.5 * bank[[5, 0, 63, 17]] + 0.5 * f
    torch.testing.assert_close(arch.bank.vectors[[5, 0, 63, 17]].double(),
                               moved / moved.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)
    untouched = [i for i in range(64) if i not in (5, 0, 63, 17)]
    assert torch.equal(arch.bank.vectors[untouched].double(), bank[untouched]) and int(arch.steps) == 1
    # Z is estimated once: the second step keeps it
    z1 = float(arch.log_z)
    method.compute_losses(_batch([1, 2, 3, 4], seed=2), VALUES)
    assert float(arch.log_z) == z1
    with pytest.raises(KeyError, match="'000099'"):
        method.compute_losses(_batch([99]), VALUES)


def test_softmax_variant_equals_a_float64_loop(shards):
    method = _method(shards, **{"instdisc.loss": '"softmax"'})
    arch = method.arch
    batch = _batch([3, 9, 12, 40])
    enc = copy.deepcopy(arch.encoder).double().train()
    bank = arch.bank.vectors.double().clone()
    loss, _ = method.compute_losses(batch, VALUES)
    with torch.no_grad():
        f = enc["head"](enc["backbone"](batch["global_crops"][:4].double()))
    f = f / f.norm(dim=1, keepdim=True)
    want = 0.0
    for i, row in enumerate([3, 9, 12, 40]):
        logits = [float(f[i] @ bank[j]) / 0.07 for j in range(64)]
        top = max(logits)
        want -= logits[row] - top - math.log(sum(math.exp(v - top) for v in logits))
    assert float(loss) == pytest.approx(want / 4, rel=1e-5)


def test_extreme_logits_stay_finite(shards):
    for loss in ("nce", "softmax"):
        method = _method(shards, **{"instdisc.temperature": "1e-4", "instdisc.loss": f'"{loss}"'})
        with torch.no_grad():
            for p in method.arch.encoder.parameters():
                p.mul_(1e3)
            method.arch.bank.vectors[:] = method.arch.bank.vectors[0]  # every entry equal: all scores tie
        batch = _batch([0, 1, 2, 3])
        batch["global_crops"] *= 1e6
        value, _ = method.compute_losses(batch, VALUES)
        value.backward()
        assert torch.isfinite(value), loss
        assert all(torch.isfinite(p.grad).all() for p in method.arch.encoder.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- distributed
_slice = slice_views


def _parity_run(rank: int, world: int, urls: str, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict

    sets = _sets(urls, **{"data.shards.batch_size": 8 // world, "schedule.base_lr": "0.5", "instdisc.loss": '"nce"',
                          "backbone.name": '"vit_test"', "backbone.overrides": "{patch_size = 7, img_size = 28}"})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), out)
    phase, arch = trainer.phases[0], trainer.method.arch
    batches = [_batch([(7 * s + 3 * i) % 64 for i in range(8)], seed=s) for s in range(3)]
    losses = [trainer.train_step(_slice(b, rank, world), step, phase)["loss"] for step, b in enumerate(batches)]
    enc = full_state_dict(arch.encoder)
    return {"losses": losses, "bank": arch.bank.vectors.numpy().copy(), "log_z": float(arch.log_z),
            "encoder": {k: v.numpy().copy() for k, v in enc.items()} if rank == 0 else None}


def test_two_processes_equal_one_with_the_bank(tmp_path, shards):
    one = _parity_run(0, 1, shards, str(tmp_path / "one"))
    two = run_distributed(_parity_run, shards, str(tmp_path / "two"), world_size=2, timeout_s=300)
    np.testing.assert_allclose(np.mean([r["losses"] for r in two], axis=0), one["losses"], atol=1e-5, rtol=0)
    assert one["losses"][0] != one["losses"][2]
    assert two[0]["log_z"] == pytest.approx(one["log_z"], abs=1e-9) and two[1]["log_z"] == two[0]["log_z"]
    np.testing.assert_array_equal(two[0]["bank"], two[1]["bank"])  # the same bank on every rank
    np.testing.assert_allclose(two[0]["bank"], one["bank"], atol=1e-5)
    for k, v in one["encoder"].items():
        np.testing.assert_allclose(two[0]["encoder"][k], v, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------------------------------- training
def _train(out: Path, urls: str, **extra: object) -> int:
    return main([TINY, "--out", str(out), *[a for kv in _sets(urls, **extra) for a in ("--set", kv)]])


def test_resume_is_bitwise_with_the_bank(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    nce = {"instdisc.loss": '"nce"'}
    _train(straight, shards, **nce)
    _train(resumed, shards, **nce, **{"train.stop_at": 3})
    _train(resumed, shards, **nce)
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "lr", "grad_norm/encoder"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    sa, sb = dcp_to_state_dict(straight / "checkpoints"), dcp_to_state_dict(resumed / "checkpoints")
    model = [k for k in sa if k.startswith("model.")]
    assert {"model.bank.vectors", "model.log_z", "model.steps", "model.encoder.head.weight"} <= set(model)
    assert all(torch.equal(sa[k], sb[k]) for k in model)
    assert torch.isfinite(sa["model.log_z"]) and int(sa["model.steps"]) == 6
    assert (straight / "export" / "backbone.pth").exists() and "own_sim" in a[1]


def test_fashion_mnist_run_lowers_the_loss_once_the_bank_holds_features(tmp_path):
    """The tiny recipe (full softmax over the bank, lr 0.03 at batch 32) for 200 steps on 4096 Fashion-MNIST images:
    the first pass pulls features towards random bank entries (loss ~16-17), from the second pass on the positives
    are features written one pass earlier and the loss falls. The backbone stays usable (k-NN within 5 points of
    random init); beating it takes longer runs than a CPU test affords (README, Methods: InstDisc)."""
    shards = write_shards(tmp_path / "shards", n=4096, per_shard=512)
    sets = _sets(shards, **{"data.shards.batch_size": 32, "schedule.epoch_length": 20, "schedule.epochs": 10,
                            "schedule.base_lr": 0.03, "schedule.lr_reference_batch": 32, "train.log_every": 5,
                            "train.checkpoint_every": 1000, "instdisc.dim": 128, "instdisc.loss": '"softmax"'})
    trainer = Trainer(load_config(TrainConfig, TINY, sets), tmp_path / "run")
    random_init = copy.deepcopy(trainer.arch.encoder["backbone"])
    assert trainer.fit() == 200
    losses = [m["loss"] for m in _metrics(tmp_path / "run")]
    before, after = _knn(random_init), _knn(trainer.arch.encoder["backbone"])
    print(f"losses {[round(x, 2) for x in losses]}; k-NN@20 random init {before:.3f}, after 200 steps {after:.3f}")
    assert np.median(losses[-10:]) < np.median(losses[:10]) - 2.0, losses
    assert after > before - 0.05, (before, after)


def test_proximal_regularisation_adds_lambda_times_the_distance_to_the_bank_entry(shards):
    plain = _method(shards, **{"instdisc.loss": '"softmax"'})
    prox = _method(shards, **{"instdisc.loss": '"softmax"', "instdisc.proximal": "30"})
    batch = _batch([2, 8, 33, 60])
    a, _ = plain.compute_losses(batch, VALUES)
    b, out = prox.compute_losses(batch, VALUES)
    f, bank = out["extras"]["f"].double(), prox.arch.bank.vectors[[2, 8, 33, 60]].double()
    distance = float(((f - bank) ** 2).sum(1).mean())
    assert float(out["losses"]["proximal"]) == pytest.approx(distance, rel=1e-5)
    assert float(b) == pytest.approx(float(a) + 30 * distance, rel=1e-5)
    with pytest.raises(ValueError, match="instdisc.proximal"):
        load_config(TrainConfig, TINY, ["instdisc.proximal=-1"])
