"""Checkpointer in one process (no process group): exact round trip, pruning, crash safety, offline export."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.checkpoint import (
    Checkpointer,
    ModelState,
    OptimizerState,
    RankLocal,
    RNGState,
    dcp_to_state_dict,
    full_state_dict,
)
from pretrain.models import build_backbone, export_backbone

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _setup(seed: int) -> tuple[nn.ModuleDict, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.ModuleDict({"backbone": build_backbone("vit_test"), "dino_head": nn.Linear(32, 8)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps: int, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 3, 28, 28, generator=g)
        model["dino_head"](model["backbone"](x)).pow(2).mean().backward()  # mask_token gets no gradient
        opt.step()
        opt.zero_grad()
        sched.step()


def _state(model, opt, sched, data: dict) -> dict:
    return {"model": ModelState(model), "optimizer": OptimizerState(model, opt), "scheduler": sched,
            "data": RankLocal(data), "rng": RNGState()}


def test_round_trip_is_exact_and_training_continues_bitwise(tmp_path):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 2)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    random.seed(11)
    np.random.seed(11)
    path = ckpt.save(2, _state(model, opt, sched, {"samples_seen": 4, "shard": "a.tar"}), extra={"loss": 0.5})
    assert path == tmp_path / "checkpoints" / "step-2"
    expected_draws = (random.random(), np.random.rand(), torch.rand(1))

    model2, opt2, sched2 = _setup(1)  # different init: everything must come from the checkpoint
    data: dict = {}
    info = ckpt.load("latest", _state(model2, opt2, sched2, data))
    assert (info.step, info.world_size, info.rank_local_restored, info.extra) == (2, 1, True, {"loss": 0.5})
    assert data == {"samples_seen": 4, "shard": "a.tar"}
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected_draws
    assert sched2.state_dict() == sched.state_dict()
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    # the never-updated mask token has no optimizer state, before and after
    assert len(opt2.state) == len(opt.state) == len(list(model.parameters())) - 1
    _train(model, opt, sched, 2, seed=5)
    _train(model2, opt2, sched2, 2, seed=5)
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k


def test_keep_last_prunes_old_checkpoints(tmp_path):
    model, opt, sched = _setup(0)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step, {"model": ModelState(model)})
    assert ckpt.steps() == [30, 40]
    assert sorted(os.listdir(tmp_path)) == ["step-30", "step-40"]
    ckpt.save(40, {"model": ModelState(model)}, extra={"again": True})  # re-saving a step replaces it
    assert ckpt.steps() == [30, 40]
    assert ckpt.load(40, {"model": ModelState(model)}).extra == {"again": True}
    meta = ckpt.meta(40)
    assert (meta["step"], meta["world_size"], meta["state_keys"], meta["extra"]) == (40, 1, ["model"], {"again": True})


def test_crash_mid_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, opt, sched = _setup(0)
    ckpt = Checkpointer(tmp_path, keep_last=3)
    ckpt.save(5, {"model": ModelState(model)})

    import pretrain.checkpoint as checkpoint_module

    real_write = checkpoint_module._write_text

    def crash_at_commit(path, text):
        if path.name == ".complete":
            raise OSError("node lost power")
        real_write(path, text)

    monkeypatch.setattr(checkpoint_module, "_write_text", crash_at_commit)
    with pytest.raises(OSError, match="power"):
        ckpt.save(6, {"model": ModelState(model)})
    monkeypatch.undo()
    assert (tmp_path / ".tmp-step-6" / ".metadata").is_file()  # fully written but never committed
    # a step directory without its commit marker (e.g. copied by hand) is not valid either
    shutil.copytree(tmp_path / "step-5", tmp_path / "step-7")
    os.remove(tmp_path / "step-7" / ".complete")
    assert ckpt.latest_valid() == 5
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ckpt.load(7, {"model": ModelState(model)})
    assert ckpt.load("latest", {"model": ModelState(model)}).step == 5
    ckpt.save(8, {"model": ModelState(model)})  # the next save clears the leftovers
    assert sorted(os.listdir(tmp_path)) == ["step-5", "step-8"]


def test_bad_input_is_rejected_with_clear_errors(tmp_path):
    model, opt, sched = _setup(0)
    with pytest.raises(ValueError, match="URL"):
        Checkpointer("s3://bucket/ckpt")
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        ckpt.load("latest", {"model": ModelState(model)})
    with pytest.raises(ValueError, match="Stateful"):
        ckpt.save(1, {"lr": 0.1})
    with pytest.raises(ValueError, match="JSON"):
        ckpt.save(1, {"model": ModelState(model)}, extra={"t": torch.zeros(1)})
    assert not tmp_path.exists() or not os.listdir(tmp_path)  # nothing was written by the rejected saves
    ckpt.save(1, {"model": ModelState(model), "counters": {"seen": 3}})
    with pytest.raises(ValueError, match="no state named"):
        ckpt.load(1, {"teacher": ModelState(model)})
    with pytest.raises(ValueError, match="lacks saved entries"):
        ckpt.load(1, {"counters": {}})
    other = nn.ModuleDict({"backbone": build_backbone("vit_test", num_register_tokens=4)})
    with pytest.raises(ValueError, match="register_tokens"):
        ckpt.load(1, {"model": ModelState(other)})


def test_offline_conversion_exports_an_official_backbone(tmp_path):
    model, opt, sched = _setup(0)
    _train(model, opt, sched, 1)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(3, {"teacher": ModelState(model), "optimizer": OptimizerState(model, opt)})
    backbone_sd = dcp_to_state_dict(tmp_path / "checkpoints", prefix="teacher.backbone.")
    assert backbone_sd.keys() == model["backbone"].state_dict().keys()
    export_backbone(backbone_sd, str(tmp_path / "teacher.pth"), name="vit_test")
    loaded = build_backbone("vit_test", weights=str(tmp_path / "teacher.pth"))
    for k, v in model["backbone"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    everything = dcp_to_state_dict(tmp_path / "checkpoints" / "step-3")
    assert any(k.startswith("optimizer.state.") for k in everything)
    with pytest.raises(ValueError, match="top-level names: \\['optimizer', 'teacher'\\]"):
        dcp_to_state_dict(tmp_path / "checkpoints", prefix="student.")
    full = full_state_dict(model["backbone"])
    assert all(v.device.type == "cpu" for v in full.values()) and full.keys() == backbone_sd.keys()
