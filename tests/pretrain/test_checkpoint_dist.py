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


def _save_sharded_then_reload(rank: int, world_size: int, ckpt_dir: str, ref_path: str) -> dict:
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
    files = sorted(p.name for p in Path(ckpt_dir, "step-2").iterdir())
    diff = _max_diff(got, ref) if rank == 0 else 0.0
    return {"diff": diff, "data": loaded_data, "restored": info.rank_local_restored, "files": files}


def _load_single_into_sharded(rank: int, world_size: int, ckpt_dir: str, ref_path: str) -> dict:
    model, opt = _sharded(1)
    info = Checkpointer(ckpt_dir).load("latest", {"model": ModelState(model), "optim": OptimizerState(model, opt)})
    got = {"model": full_state_dict(model), "optim": _full_optim(model, opt)}
    ref = torch.load(ref_path, weights_only=False)
    return {"step": info.step, "world": info.world_size, "diff": _max_diff(got, ref) if rank == 0 else 0.0}


def test_two_rank_checkpoint_reloads_sharded_and_resumes_in_one_process(tmp_path):
    ckpt_dir, ref_path = str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")
    results = run_distributed(_save_sharded_then_reload, ckpt_dir, ref_path, world_size=2)
    assert {"__0_0.distcp", "__1_0.distcp", "rank-00000.pt", "rank-00001.pt", ".complete"} <= set(results[0]["files"])
    for rank, r in enumerate(results):
        assert r["diff"] == 0.0
        assert r["restored"] and r["data"] == {"rank": rank, "samples": 2 * (rank + 1)}

    # 2 -> 1: a plain model in this process (no process group) gets the same model and optimizer state
    ref = torch.load(ref_path, weights_only=False)
    model, opt = _build(1)
    data: dict = {}
    info = Checkpointer(ckpt_dir).load("latest", {"model": ModelState(model), "optim": OptimizerState(model, opt),
                                                  "data": RankLocal(data)})
    assert (info.step, info.world_size, info.extra) == (2, 2, {"world": 2})
    assert not info.rank_local_restored and data == {}  # per-rank state cannot map onto another world size
    assert _max_diff({"model": full_state_dict(model), "optim": _full_optim(model, opt)}, ref) == 0.0
    assert len(ref["optim"]) == len(list(model.parameters())) - 1  # mask_token never had state


def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path):
    ckpt_dir, ref_path = str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")
    model, opt = _build(0)
    _train(model, opt, 0, 1)
    Checkpointer(ckpt_dir).save(4, {"model": ModelState(model), "optim": OptimizerState(model, opt)})
    torch.save({"model": full_state_dict(model), "optim": _full_optim(model, opt)}, ref_path)
    results = run_distributed(_load_single_into_sharded, ckpt_dir, ref_path, world_size=2)
    for r in results:
        assert (r["step"], r["world"], r["diff"]) == (4, 1, 0.0)

