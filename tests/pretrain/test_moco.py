"""MoCo v1/v2 (``method = "moco"``) and v3 (``method = "mocov3"``): losses against float64 references, the queue,
Shuffle-BN, 2 gloo processes against 1, bitwise resume and short training runs on Fashion-MNIST."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.checkpoint import dcp_to_state_dict
from pretrain.methods.moco import MoCoArch, MoCoConfig, MoCoMethod, MoCoSection
from pretrain.methods.mocov3 import MoCoV3Config, MoCoV3Method
from pretrain.optim import Schedules, ScheduleValues
from pretrain.ssl.meta_arch import BackboneConfig
from pretrain.train import TrainConfig, Trainer, main
from pretrain.utils.config import load_config

from .._dist import run_distributed
from .trainer_utils import write_shards

RECIPES = Path(__file__).resolve().parents[2] / "pretrain" / "recipes"
TINY = str(RECIPES / "moco_tiny_cpu.toml")
VALUES = ScheduleValues(lr=0.1, last_layer_lr=0.1, weight_decay=0.0, momentum=0.9, teacher_temp=0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), n=64, per_shard=32)


V2 = {"backbone.name": '"resnet_test"', "backbone.overrides": "{}", "moco.queue_size": "12", "moco.dim": "16"}
V3 = {"backbone.name": '"vit_test"', "backbone.overrides": "{patch_size = 7, img_size = 28, init_values = 0}",
      "mocov3.dim": "16", "mocov3.mlp_dim": "32"}


def _sets(urls: str = "/nonexistent-{0..0}.tar", **extra: object) -> list[str]:
    """Overrides making a tiny recipe a seconds-long run (batch 4, 6 steps); V2 / V3 shrink the networks."""
    sets = {"data.shards.urls": f'["{urls}"]', "data.shards.batch_size": "4", "data.shards.num_workers": "0",
            "data.shards.shuffle_buffer": "8", "schedule.epoch_length": "2", "schedule.epochs": "3",
            "schedule.warmup_epochs": "0", "schedule.lr_reference_batch": "4", "train.log_every": "1",
            "train.monitor_every": "2", "train.checkpoint_every": "2", "train.tensorboard": "false"}
    sets.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in sets.items()]


def _method(**extra: object) -> MoCoMethod:
    torch.manual_seed(0)
    method = MoCoMethod(load_config(TrainConfig, TINY, _sets(**{**V2, **extra})))
    method.setup(torch.device("cpu"))
    return method


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_parse_with_the_papers_settings():
    v1 = load_config(TrainConfig, str(RECIPES / "mocov1_resnet50.toml"))
    v2 = load_config(TrainConfig, str(RECIPES / "mocov2_resnet50.toml"))
    for cfg, version in ((v1, 1), (v2, 2)):
        assert type(cfg) is MoCoConfig and cfg.moco.version == version and cfg.backbone.name == "resnet50"
        assert cfg.moco.queue_size == 65536 and cfg.moco.dim == 128 and cfg.train.optimizer == "sgd"
        assert cfg.moco.sgd_momentum == 0.9 and cfg.schedule.weight_decay == cfg.schedule.weight_decay_end == 1e-4
        assert cfg.schedule.momentum_teacher == cfg.schedule.final_momentum_teacher == 0.999
        assert cfg.schedule.epochs == 200 and cfg.schedule.base_lr == 0.03 and cfg.schedule.warmup_epochs == 0
        assert cfg.data.shards.batch_size * 8 == cfg.schedule.lr_reference_batch == 256  # 8 GPUs x 32
        c = cfg.data.crops
        assert c.global_scale == (0.2, 1.0) and c.grayscale_p == 0.2 and c.flip_p == 0.5 and c.n_local == 0
    assert v1.moco.tau == 0.07 and v2.moco.tau == 0.2
    s1, s2 = Schedules(v1.schedule, 256), Schedules(v2.schedule, 256)  # v1: steps at 120 and 160 epochs; v2: cosine
    e = v1.schedule.epoch_length
    lrs = [s1.at(i * e).lr for i in (0, 119, 120, 159, 160, 199)]
    assert lrs == pytest.approx([0.03] * 2 + [3e-3] * 2 + [3e-4] * 2)
    assert s2.at(0).lr == pytest.approx(0.03) and s2.at(100 * e).lr == pytest.approx(0.015, rel=1e-3)
    with pytest.raises(ValueError, match="lr_milestones"):
        load_config(TrainConfig, TINY, ["schedule.lr_milestones=[3, 2]"])
    assert v1.data.crops.jitter_p == 1.0 and v1.data.crops.hue == 0.4 and v1.data.crops.blur_p_global1 == 0.0
    assert v2.data.crops.jitter_p == 0.8 and v2.data.crops.blur_p_global1 == v2.data.crops.blur_p_global2 == 0.5
    tiny = load_config(TrainConfig, TINY)
    assert type(tiny) is MoCoConfig and tiny.backbone.name == "resnet18_small" and tiny.data.crops.global_size == 28
    with pytest.raises(ValueError, match="moco.version"):
        load_config(TrainConfig, TINY, ["moco.version=4"])


# ---------------------------------------------------------------------------------------------- the loss
def test_loss_equals_a_float64_reference():
    method = _method(**{"moco.version": 2, "moco.shuffle_bn": "false"})
    arch = method.arch
    g = torch.Generator().manual_seed(1)
    batch = {"global_crops": torch.randn(8, 3, 28, 28, generator=g)}
    ref_q, ref_k = copy.deepcopy(arch.query).double().train(), copy.deepcopy(arch.key).double().train()
    queue = arch.queue.clone()
    loss, out = method.compute_losses(batch, VALUES)
    x1, x2 = batch["global_crops"].double().chunk(2)
    q = ref_q["head"](ref_q["backbone"](x1))
    k = ref_k["head"](ref_k["backbone"](x2))
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.double().T], 1) / 0.2
    ref = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    assert abs(float(loss.detach()) - float(ref)) < 1e-5 and float(loss) > 0
    torch.testing.assert_close(out["extras"]["k"].double(), k, atol=1e-5, rtol=0)
    # v1: a linear head and T = 0.07
    v1 = _method(**{"moco.version": 1, "moco.temperature": 0})
    assert isinstance(v1.arch.query["head"], torch.nn.Linear) and v1.cfg.moco.tau == 0.07


def test_queue_enqueues_in_order_and_wraps_around():
    arch = MoCoArch(BackboneConfig(name="resnet_test"), MoCoSection(dim=2, queue_size=5))
    keys = [torch.full((3, 2), float(i)) for i in range(1, 4)]
    arch.enqueue(keys[0])
    assert arch.queue[:3, 0].tolist() == [1, 1, 1] and int(arch.queue_ptr) == 3
    arch.enqueue(keys[1])  # positions 3, 4, then 0
    assert arch.queue[:, 0].tolist() == [2, 1, 1, 2, 2] and int(arch.queue_ptr) == 1
    arch.enqueue(keys[2])
    assert arch.queue[:, 0].tolist() == [2, 3, 3, 3, 2] and int(arch.queue_ptr) == 4
    with pytest.raises(ValueError, match="queue_size"):
        arch.enqueue(torch.zeros(6, 2))


def test_extreme_logits_stay_finite():
    method = _method(**{"moco.temperature": "1e-4"})
    arch = method.arch
    with torch.no_grad():
        arch.queue.copy_(F.normalize(torch.ones_like(arch.queue), dim=1))  # every negative equals the queries
        for p in arch.query.parameters():
            p.mul_(1e3)
    loss, _ = method.compute_losses({"global_crops": 1e6 * torch.randn(8, 3, 28, 28)}, VALUES)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in arch.query.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- distributed
PARITY = {**V2, "backbone.name": '"vit_test"', "backbone.overrides": "{patch_size = 7, img_size = 28}",
          "moco.queue_size": "20", "schedule.base_lr": "0.5"}


def _batches(n_steps: int, b: int = 8):
    g = torch.Generator().manual_seed(0)
    return [{"global_crops": torch.randn(2 * b, 3, 28, 28, generator=g)} for _ in range(n_steps)]


def _slice(batch: dict, rank: int, world: int) -> dict:
    x = batch["global_crops"]
    views = x.reshape(2, x.shape[0] // 2, *x.shape[1:])
    per = views.shape[1] // world
    return {"global_crops": views[:, rank * per:(rank + 1) * per].reshape(-1, *x.shape[1:])}


def _parity_run(rank: int, world: int, recipe: str, sets: dict, out: str) -> dict:
    from pretrain.checkpoint import full_state_dict
    from pretrain.utils.dist import shuffle_batch, unshuffle_batch

    cfg = load_config(TrainConfig, recipe, _sets(**sets, **{"data.shards.batch_size": 8 // world}))
    trainer = Trainer(cfg, out)
    phase, arch = trainer.phases[0], trainer.method.arch
    losses = [trainer.train_step(_slice(b, rank, world), step, phase)["loss"] for step, b in enumerate(_batches(3))]
    result = {"losses": losses, "buffers": {k: v.numpy().copy() for k, v in arch.named_buffers()}}
    query = full_state_dict(arch.query)
    result["query"] = {k: v.numpy().copy() for k, v in query.items()} if rank == 0 else None
    if hasattr(arch, "queue"):  # Shuffle-BN: a real cross-rank permutation, undone exactly
        ids = torch.arange(8 // world, dtype=torch.float64) + rank * (8 // world)
        shuffled, undo = shuffle_batch(ids, torch.Generator().manual_seed(5))
        result["shuffled"] = shuffled.tolist()
        result["unshuffled"] = unshuffle_batch(shuffled, undo).tolist()
        x = _slice(_batches(1)[0], rank, world)["global_crops"][: 8 // world]
        key = arch.key.eval()
        with torch.no_grad():
            plain = arch.embed(key, x)
            moved, undo = shuffle_batch(x, torch.Generator().manual_seed(6))
            result["keys"] = (plain.numpy().copy(), unshuffle_batch(arch.embed(key, moved), undo).numpy().copy())
    return result


def _compare(single: dict, ranks: list[dict], buffers: tuple[str, ...]) -> None:
    np.testing.assert_allclose(np.mean([r["losses"] for r in ranks], axis=0), single["losses"], atol=1e-5, rtol=0)
    assert single["losses"][0] != single["losses"][2]
    for k, v in single["query"].items():
        np.testing.assert_allclose(ranks[0]["query"][k], v, atol=1e-5, err_msg=k)
    for name in buffers:
        np.testing.assert_array_equal(ranks[0]["buffers"][name], ranks[1]["buffers"][name])  # same on every rank
        np.testing.assert_allclose(ranks[0]["buffers"][name], single["buffers"][name], atol=1e-5, err_msg=name)


V3_TINY = str(RECIPES / "mocov3_tiny_cpu.toml")
V3_PARITY = {**V3, "schedule.base_lr": "0.02", "train.optimizer": '"sgd"'}  # SGD: no Adam amplification of 1e-7s


def _both(rank: int, world: int, out: str) -> dict:
    return {"v2": _parity_run(rank, world, TINY, PARITY, f"{out}/v2"),
            "v3": _parity_run(rank, world, V3_TINY, V3_PARITY, f"{out}/v3")}


def test_two_processes_equal_one_with_queue_shuffle_bn_and_global_bn(tmp_path):
    one = _both(0, 1, str(tmp_path / "one"))
    two = run_distributed(_both, str(tmp_path / "two"), world_size=2, timeout_s=300)
    single, ranks = one["v2"], [r["v2"] for r in two]
    _compare(single, ranks, ("queue", "queue_ptr"))
    assert int(single["buffers"]["queue_ptr"]) == 24 % 20
    # the permutation moves samples across ranks and unshuffling restores every rank's own order
    assert sorted(ranks[0]["shuffled"] + ranks[1]["shuffled"]) == list(range(8))
    assert single["shuffled"] == list(range(8))  # one process: the identity
    assert any(v >= 4 for v in ranks[0]["shuffled"]) and any(v < 4 for v in ranks[1]["shuffled"])
    assert [r["unshuffled"] for r in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for r in ranks:  # per-sample (eval-mode) key features are unchanged by the shuffle
        np.testing.assert_allclose(r["keys"][1], r["keys"][0], atol=1e-6)
    # MoCo v3: in-batch keys gathered across ranks, projector/predictor BN over the global batch
    _compare(one["v3"], [r["v3"] for r in two], ("query.projector.1.running_mean", "query.projector.1.running_var",
                                                 "key.projector.4.running_var"))


# ---------------------------------------------------------------------------------------------- training
def _train(out: Path, urls: str, recipe: str = TINY, **extra: object) -> int:
    extra = {**(V2 if recipe == TINY else V3), **extra}
    return main([recipe, "--out", str(out), *[a for kv in _sets(urls, **extra) for a in ("--set", kv)]])


def test_resume_is_bitwise_with_the_queue(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, shards)
    _train(resumed, shards, **{"train.stop_at": 3})
    assert int(dcp_to_state_dict(resumed / "checkpoints")["model.queue_ptr"]) == (3 * 4) % 12
    _train(resumed, shards)
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 7)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "lr", "momentum", "grad_norm/query"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    sa, sb = dcp_to_state_dict(straight / "checkpoints"), dcp_to_state_dict(resumed / "checkpoints")
    model = [k for k in sa if k.startswith("model.")]
    assert {"model.queue", "model.key.head.0.weight", "model.key.backbone.bn1.running_mean"} <= set(model)
    assert all(torch.equal(sa[k], sb[k]) for k in model)
    assert (straight / "export" / "backbone.pth").exists() and (straight / "export" / "key_backbone.pth").exists()
    assert "pos_sim" in a[1] and "key_std" in a[1]


# ---------------------------------------------------------------------------------------------- MoCo v3


def _v3(**extra: object) -> MoCoV3Method:
    torch.manual_seed(0)
    method = MoCoV3Method(load_config(TrainConfig, V3_TINY, _sets(**{**V3, **extra})))
    method.setup(torch.device("cpu"))
    return method


def test_v3_recipes_parse_with_the_papers_settings():
    cfg = load_config(TrainConfig, str(RECIPES / "mocov3_vits16.toml"))
    assert type(cfg) is MoCoV3Config and cfg.backbone.overrides["patch_size"] == 16
    assert cfg.mocov3.temperature == 0.2 and cfg.mocov3.freeze_patch_embed and cfg.mocov3.mlp_dim == 4096
    s = cfg.schedule
    assert s.base_lr == pytest.approx(1.5e-4 * 4096 / 256) and s.lr_reference_batch == 4096 == 32 * 128
    assert s.epochs == 300 and s.warmup_epochs == 40 and s.weight_decay == s.weight_decay_end == 0.1
    assert s.momentum_teacher == 0.99 and s.final_momentum_teacher == 1.0 and cfg.train.optimizer == "adamw"
    assert cfg.data.crops.global_scale == (0.08, 1.0) and cfg.data.crops.solarize_p == 0.2
    tiny = load_config(TrainConfig, V3_TINY)
    assert type(tiny) is MoCoV3Config and tiny.backbone.name == "vit_mini"


def test_v3_loss_equals_a_float64_reference_and_patch_embed_is_frozen():
    method = _v3()
    arch = method.arch
    g = torch.Generator().manual_seed(2)
    batch = {"global_crops": torch.randn(8, 3, 28, 28, generator=g)}
    ref = copy.deepcopy(arch).double().train()
    loss, _ = method.compute_losses(batch, VALUES)
    x1, x2 = batch["global_crops"].double().chunk(2)

    def unit(x):
        return x / x.norm(dim=1, keepdim=True)

    q1, q2 = (unit(ref.predictor(ref.query["projector"](ref.query["backbone"](x)))) for x in (x1, x2))
    k1, k2 = (unit(ref.key["projector"](ref.key["backbone"](x))) for x in (x1, x2))

    def ctr(q, k):  # cross entropy of q_i against all keys, target k_i
        logits = q @ k.T / 0.2
        return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()

    expected = (ctr(q1, k2) + ctr(q2, k1)) * 2 * 0.2
    assert abs(float(loss.detach()) - float(expected)) < 1e-5
    # the frozen random patch embedding: no gradient, not in the optimizer; everything else is trained
    loss.backward()
    frozen = list(arch.query["backbone"].patch_embed.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    assert not trained & {id(p) for p in frozen} and id(arch.predictor[0].weight) in trained
    assert not _v3(**{"mocov3.freeze_patch_embed": "false"}).arch.query["backbone"].patch_embed.proj.weight.grad
    assert _v3(**{"mocov3.freeze_patch_embed": "false"}).arch.query["backbone"].patch_embed.proj.weight.requires_grad


def test_v3_extreme_logits_stay_finite():
    method = _v3(**{"mocov3.temperature": "1e-4"})
    x = 1e6 * torch.ones(8, 3, 28, 28)  # identical images: every key ties with the positive
    loss, _ = method.compute_losses({"global_crops": x}, VALUES)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in method.arch.predictor.parameters())


def test_v3_trains_on_fashion_mnist_and_resumes_bitwise(tmp_path, shards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sets = {"schedule.epochs": "4", "schedule.epoch_length": "10", "data.shards.batch_size": "16",
            "data.shards.shuffle_buffer": "32", "schedule.lr_reference_batch": "16", "schedule.base_lr": "3e-3",
            "mocov3.dim": "32", "mocov3.mlp_dim": "64", "train.checkpoint_every": "10"}
    _train(straight, shards, V3_TINY, **sets)
    _train(resumed, shards, V3_TINY, **sets, **{"train.stop_at": 15})
    _train(resumed, shards, V3_TINY, **sets)
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 41)) == [m["step"] for m in b]
    for ma, mb in zip(a, b):
        for key in ("loss", "lr", "momentum", "grad_norm/query", "grad_norm/predictor"):
            assert ma[key] == mb[key], (ma["step"], key, ma[key], mb[key])
    assert a[0]["momentum"] == 0.99 and a[-1]["momentum"] > 0.99  # cosine 0.99 -> 1
    first, last = np.mean([m["loss"] for m in a[:5]]), np.mean([m["loss"] for m in a[-5:]])
    assert last < first - 0.1, (first, last)  # 40 steps of 16 Fashion-MNIST images
    assert (straight / "export" / "backbone.pth").exists()


@pytest.mark.slow  # ~35 s alone, ~70 s on the shared 2-core VM; the v3 Fashion-MNIST run above is the fast one
def test_v2_lowers_its_loss_on_fashion_mnist(tmp_path, shards):
    """Once the queue holds real keys (after 2 steps; before, its random keys are easy negatives and the loss
    starts far below log(K + 1)), 60 steps of 16 images lower the loss."""
    sets = {"schedule.epochs": "6", "schedule.epoch_length": "10", "data.shards.batch_size": "16",
            "data.shards.shuffle_buffer": "32", "schedule.lr_reference_batch": "16", "schedule.base_lr": "0.03",
            "moco.queue_size": "32", "moco.dim": "32", "train.checkpoint_every": "100"}
    _train(tmp_path / "run", shards, **sets)
    loss = [m["loss"] for m in _metrics(tmp_path / "run")]
    assert len(loss) == 60 and loss[0] < 1.0  # step 1: random queue
    early, late = np.mean(loss[2:12]), np.mean(loss[-10:])
    assert late < early - 0.05, (early, late)
