"""DCP checkpoints across world sizes: 2 sharded ranks -> fresh sharded model, 2 -> 1 and 1 -> 2 resharding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from pretrain.checkpoint import Checkpointer, ModelState, OptimizerState, RankLocal, full_state_dict
from pretrain.models import build_backbone
from tests._dist import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_backbone("vit_test")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world_size: int, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(4, 3, 28, 28, generator=g).chunk(world_size)[rank]
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _full_optim(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {p: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in full.get("state", {}).items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diffs = [0.0]
    for k in a:
        if isinstance(a[k], dict):
            diffs.append(_max_diff(a[k], b[k]))
        else:
            diffs.append((a[k].float() - b[k].float()).abs().max().item())
    return max(diffs)


def _sharded(seed: int):
    from pretrain.parallel import device_mesh, get_dist_info, parallelize

    model, _ = _build(seed)
    model = parallelize(model, mesh=device_mesh(get_dist_info()), mp_policy="fp32")
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)


def _run_all(rank: int, world_size: int, tmp: str) -> dict:
    """2 ranks: save a sharded checkpoint and reload it into a fresh sharded model; load a 1-process checkpoint."""
    ckpt_dir, ref_path = f"{tmp}/ckpt2", f"{tmp}/ref2.pt"
    model, opt = _sharded(0)
    _train(model, opt, rank, world_size)
    data = {"rank": rank, "samples": 2 * (rank + 1)}
    ckpt = Checkpointer(ckpt_dir, keep_last=2)
    ckpt.save(2, {"model": ModelState(model), "optim": OptimizerState(model, opt), "data": RankLocal(data)},
              extra={"world": world_size})
    ref = {"model": full_state_dict(model), "optim": _full_optim(model, opt)}
    if rank == 0:
        torch.save(ref, ref_path)
    # a fresh, differently initialised sharded model + optimizer takes the checkpoint exactly
    fresh, fresh_opt = _sharded(1)
    loaded_data: dict = {}
    info = ckpt.load("latest", {"model": ModelState(fresh), "optim": OptimizerState(fresh, fresh_opt),
                                "data": RankLocal(loaded_data)})
    got = {"model": full_state_dict(fresh), "optim": _full_optim(fresh, fresh_opt)}
    result = {"diff": _max_diff(got, ref) if rank == 0 else 0.0, "data": loaded_data,
              "restored": info.rank_local_restored, "files": sorted(p.name for p in Path(ckpt_dir, "step-2").iterdir())}

    # 1 -> 2: the checkpoint the test process wrote without a process group
    model, opt = _sharded(1)
    state = {"model": ModelState(model), "optim": OptimizerState(model, opt)}
    info = Checkpointer(f"{tmp}/ckpt1").load("latest", state)
    got = {"model": full_state_dict(model), "optim": _full_optim(model, opt)}
    ref1 = torch.load(f"{tmp}/ref1.pt", weights_only=False)
    result["from_single"] = (info.step, info.world_size, _max_diff(got, ref1) if rank == 0 else 0.0)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("dcp")
    model, opt = _build(0)
    _train(model, opt, 0, 1)
    Checkpointer(tmp / "ckpt1").save(4, {"model": ModelState(model), "optim": OptimizerState(model, opt)})
    torch.save({"model": full_state_dict(model), "optim": _full_optim(model, opt)}, tmp / "ref1.pt")
    return tmp, run_distributed(_run_all, str(tmp), world_size=2)


def test_two_rank_checkpoint_reloads_into_fresh_sharded_model(run):
    _, results = run
    assert {"__0_0.distcp", "__1_0.distcp", "rank-00000.pt", "rank-00001.pt", ".complete"} <= set(results[0]["files"])
    for rank, r in enumerate(results):
        assert r["diff"] == 0.0
        assert r["restored"] and r["data"] == {"rank": rank, "samples": 2 * (rank + 1)}


def test_two_rank_checkpoint_resumes_in_one_process(run):
    tmp, _ = run
    ref = torch.load(tmp / "ref2.pt", weights_only=False)
    model, opt = _build(1)  # a plain model in this process, no process group
    data: dict = {}
    info = Checkpointer(tmp / "ckpt2").load("latest", {"model": ModelState(model), "optim": OptimizerState(model, opt),
                                                       "data": RankLocal(data)})
    assert (info.step, info.world_size, info.extra) == (2, 2, {"world": 2})
    assert not info.rank_local_restored and data == {}  # per-rank state cannot map onto another world size
    assert _max_diff({"model": full_state_dict(model), "optim": _full_optim(model, opt)}, ref) == 0.0
    assert len(ref["optim"]) == len(list(model.parameters())) - 1  # mask_token never had state


def test_one_process_checkpoint_resumes_on_two_ranks(run):
    _, results = run
    for r in results:
        assert r["from_single"] == (4, 1, 0.0)
