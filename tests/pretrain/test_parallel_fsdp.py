"""FSDP2 on 2 real gloo processes: parity with an unsharded model, bf16 policy, fp32 heads, shard-local EMA.

One spawn runs all checks (process start-up dominates the cost); each test asserts on its part of the result.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pretrain.models import build_backbone
from tests._dist import run_distributed

WORLD = 2
STEPS = 3
MOMENTUM = 0.8


class _Head(nn.Module):
    """A small projection head that records the dtypes it computes in."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, out)
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.dtype, self.fc1.weight.dtype))
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _student() -> nn.ModuleDict:
    return nn.ModuleDict({"backbone": build_backbone("vit_test"), "dino_head": _Head(32, 16)})


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model["dino_head"](model["backbone"](x)) if isinstance(model, nn.ModuleDict) else model(x)
    return (out.float() - y).pow(2).mean()


def _data(out_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 28, 28, generator=g), torch.randn(4, out_dim, generator=g)


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def _max_diff(full: dict[str, torch.Tensor], ref: nn.Module) -> float:
    ref_state = ref.state_dict()
    assert set(full) == set(ref_state), sorted(set(full) ^ set(ref_state))
    return max((full[k].float() - ref_state[k].float()).abs().max().item() for k in ref_state)


def _run_all(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    from pretrain.checkpoint import full_state_dict
    from pretrain.parallel import assert_same_sharding, device_mesh, ema_update_, init_distributed, parallelize

    info = init_distributed()  # the harness already created the group from the env: adopted, not re-created
    result: dict = {"info": (info.rank, info.world_size, info.backend, str(info.device), info.is_distributed)}
    mesh = device_mesh(info)
    result["mesh"] = (mesh.device_type, mesh.size(), mesh.mesh_dim_names)

    # 1. fp32 parity: per-block + root FSDP2 vs the unsharded model on the full batch, 3 SGD steps.
    torch.manual_seed(0)
    ref = build_backbone("vit_test")
    model = parallelize(copy.deepcopy(ref), mesh=mesh, mp_policy="fp32", forward_methods=("forward_features",))
    result["block_is_fsdp"] = all(isinstance(b, FSDPModule) for b in model.blocks) and isinstance(model, FSDPModule)
    qkv = model.blocks[0].attn.qkv.weight
    result["placements"] = [str(p) for p in qkv.placements] if isinstance(qkv, DTensor) else None
    result["shard0"] = isinstance(qkv, DTensor) and qkv.placements[0] == Shard(0)
    result["local_rows"] = qkv.to_local().shape[0]
    x, y = _data(32)
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.5), torch.optim.SGD(ref.parameters(), lr=0.5)
    result["losses"], result["ref_losses"] = [], []
    for _ in range(STEPS):
        loss = _loss(model, x.chunk(world_size)[rank], y.chunk(world_size)[rank])
        loss.backward()
        opt.step()
        opt.zero_grad()
        result["losses"].append(_mean_over_ranks(loss))
        ref_loss = _loss(ref, x, y)
        ref_loss.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        result["ref_losses"].append(ref_loss.item())
    result["param_max_diff"] = _max_diff(full_state_dict(model, rank0_only=False), ref)
    local_x = x.chunk(world_size)[rank]
    with torch.no_grad():  # a registered forward method gathers the root's parameters like forward does
        feats = model.forward_features(local_x)["x_norm_patchtokens"]
        ref_feats = ref.forward_features(local_x)["x_norm_patchtokens"]
        result["forward_method_max_diff"] = (feats - ref_feats).abs().max().item()

    # 2. bf16 policy: bf16 compute in blocks, fp32 heads, fp32 master params and gradients.
    torch.manual_seed(0)
    ref = _student()
    student = parallelize(copy.deepcopy(ref), mesh=mesh, mp_policy="bf16")
    block_out = []
    # blocks take and return lists of token tensors (packed multi-crop)
    student["backbone"].blocks[0].register_forward_hook(lambda m, i, o: block_out.append(o[0].dtype))
    x, y = _data(16)
    loss = _loss(student, x.chunk(world_size)[rank], y.chunk(world_size)[rank])
    loss.backward()
    result["bf16_block_out"] = str(block_out[0])
    result["bf16_head_seen"] = [str(d) for d in student["dino_head"].seen[0]]
    result["bf16_param_dtypes"] = sorted({str(p.to_local().dtype) for p in student.parameters()})
    result["bf16_grad_dtypes"] = sorted(
        {str(p.grad.to_local().dtype) for p in student.parameters() if p.grad is not None}
    )
    result["bf16_loss"], result["bf16_ref_loss"] = _mean_over_ranks(loss), _loss(ref, x, y).item()

    # 3. EMA: identically sharded teacher follows the student shard by shard; compare with a plain reference.
    torch.manual_seed(0)
    base = _student()
    student = parallelize(copy.deepcopy(base), mesh=mesh, mp_policy="fp32")
    teacher = parallelize(copy.deepcopy(base), mesh=mesh, mp_policy="fp32").requires_grad_(False)
    ref_s, ref_t = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    assert_same_sharding(teacher, student)
    opt, opt_ref = torch.optim.SGD(student.parameters(), lr=0.5), torch.optim.SGD(ref_s.parameters(), lr=0.5)
    for _ in range(STEPS):
        _loss(student, x.chunk(world_size)[rank], y.chunk(world_size)[rank]).backward()
        opt.step()
        opt.zero_grad()
        ema_update_(teacher.parameters(), student.parameters(), MOMENTUM)
        _loss(ref_s, x, y).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        with torch.no_grad():
            for t, s in zip(ref_t.parameters(), ref_s.parameters()):
                t.mul_(MOMENTUM).add_(s, alpha=1 - MOMENTUM)
    result["ema_teacher_max_diff"] = _max_diff(full_state_dict(teacher, rank0_only=False), ref_t)
    result["ema_student_max_diff"] = _max_diff(full_state_dict(student, rank0_only=False), ref_s)

    # 4. No communication: only rank 0 updates; a collective inside would deadlock against rank 1's barrier.
    before = [p.to_local().clone() for p in teacher.parameters()]
    if rank == 0:
        ema_update_(teacher, student, 0.5, check=True)
    dist.barrier()
    after = [p.to_local() for p in teacher.parameters()]
    expected = [0.5 * b + 0.5 * s.to_local() for b, s in zip(before, student.parameters())]
    target = expected if rank == 0 else before
    result["solo_update_max_diff"] = max((a - t).abs().max().item() for a, t in zip(after, target) if a.numel())
    return result


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_run_all, world_size=WORLD)


def test_init_distributed_reads_env_and_adopts_the_group(results):
    for rank, r in enumerate(results):
        assert r["info"] == (rank, WORLD, "gloo", "cpu", True)
        assert r["mesh"] == ("cpu", WORLD, ("dp",))


def test_fsdp_units_are_per_block_and_sharded(results):
    for r in results:
        assert r["block_is_fsdp"]
        assert r["shard0"], r["placements"]
        assert r["local_rows"] == 3 * 32 // WORLD  # qkv weight (96, 32) split by rows over 2 ranks


def test_fsdp_matches_unsharded_reference_over_three_sgd_steps(results):
    for r in results:
        assert len(r["losses"]) == STEPS
        for got, want in zip(r["losses"], r["ref_losses"]):
            assert abs(got - want) <= 1e-5, (r["losses"], r["ref_losses"])
        assert r["ref_losses"][-1] < r["ref_losses"][0]  # the steps did train
        assert r["param_max_diff"] <= 1e-6
        assert r["forward_method_max_diff"] <= 1e-5


def test_bf16_policy_keeps_fp32_params_and_grads_and_fp32_heads(results):
    for r in results:
        assert r["bf16_block_out"] == "torch.bfloat16"
        assert r["bf16_head_seen"] == ["torch.float32", "torch.float32"]
        assert r["bf16_param_dtypes"] == ["torch.float32"]
        assert r["bf16_grad_dtypes"] == ["torch.float32"]
        assert r["bf16_loss"] == pytest.approx(r["bf16_ref_loss"], rel=2e-2)
        assert r["bf16_loss"] != r["bf16_ref_loss"]  # bf16 compute really happened


def test_ema_on_shards_equals_single_process_ema(results):
    for r in results:
        assert r["ema_student_max_diff"] <= 1e-6
        assert r["ema_teacher_max_diff"] <= 1e-6


def test_ema_update_issues_no_collective(results):
    for r in results:
        assert r["solo_update_max_diff"] == 0.0
