"""Single-process behaviour of pretrain.parallel: launcher env parsing, no process group, AC/compile, EMA math."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pretrain.models import build_backbone
from pretrain.parallel import (
    assert_same_sharding,
    backbone_modules,
    device_mesh,
    ema_update_,
    init_distributed,
    mixed_precision_policy,
    parallelize,
    read_launch_env,
)

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "DINOFORGE_DIST_INIT_METHOD", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for var in _LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_read_launch_env_torchrun_slurm_and_single():
    env = read_launch_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (5, 8, 1, 4, "torchrun")
    env = read_launch_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                           "SLURM_NTASKS_PER_NODE": "2(x2)"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (3, 4, 1, 2, "slurm")
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0"}, "WORLD_SIZE"),
        ({"RANK": "4", "WORLD_SIZE": "2"}, "outside world size"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ],
)
def test_read_launch_env_rejects_bad_values(env, message):
    with pytest.raises(ValueError, match=message):
        read_launch_env(env)


def test_init_distributed_single_process_creates_no_process_group(clean_env):
    info = init_distributed()
    assert not dist.is_initialized()
    assert (info.rank, info.world_size, info.backend, info.is_distributed, info.is_main) == (0, 1, None, False, True)
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_mesh(info) is None


def test_init_distributed_errors_name_the_fix(clean_env):
    with pytest.raises(ValueError, match="backend='mpi'"):
        init_distributed("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            init_distributed("nccl")
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed()
    assert not dist.is_initialized()


def test_parallelize_without_mesh_is_in_place_and_numerically_identical():
    torch.manual_seed(0)
    ref = build_backbone("vit_test")
    model = copy.deepcopy(ref)
    assert parallelize(model, mesh=None, mp_policy="bf16") is model
    assert type(model) is type(ref)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(model(x), ref(x))


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_activation_checkpointing_recomputes_blocks_with_same_gradients():
    torch.manual_seed(0)
    ref = build_backbone("vit_test")
    model = parallelize(copy.deepcopy(ref), mesh=None, activation_checkpointing=True)
    calls = []
    model.blocks[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 28, 28)
    grads = _grads(model, x)
    assert len(calls) == 2  # forward + recomputation in backward
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for got, want in zip(grads, _grads(ref, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_compile_per_block_keeps_names_and_outputs():
    torch.manual_seed(0)
    ref = build_backbone("vit_test")
    model = parallelize(copy.deepcopy(ref), mesh=None, compile=True, compile_backend="aot_eager")
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_grads(model, x)[0], _grads(ref, x)[0], rtol=1e-5, atol=1e-6)


def test_backbone_discovery_and_policy_validation():
    student = nn.ModuleDict({"backbone": build_backbone("vit_test"), "dino_head": nn.Linear(32, 8)})
    assert [name for name, _ in backbone_modules(student)] == ["backbone"]
    assert mixed_precision_policy("bf16").param_dtype == torch.bfloat16
    assert mixed_precision_policy("bf16").reduce_dtype == torch.float32
    with pytest.raises(ValueError, match="mp_policy='fp16'"):
        mixed_precision_policy("fp16")


def test_ema_update_matches_formula_on_plain_tensors():
    torch.manual_seed(0)
    teacher, student = nn.Linear(4, 3), nn.Linear(4, 3)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update_(teacher, student, 0.9, check=True)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-7)
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))


def test_ema_update_rejects_mismatches():
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)
    with pytest.raises(ValueError, match="teacher has 2 parameters but student has 1"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.9)
    with pytest.raises(ValueError, match="parameter 0"):
        assert_same_sharding(nn.Linear(2, 3), nn.Linear(3, 2))
