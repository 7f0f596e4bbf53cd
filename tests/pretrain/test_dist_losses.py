"""2-process gloo: distributed center, Sinkhorn-Knopp and global KoLeo equal the single-process values on the
concatenated batch, and the KoLeo gradients match (data-parallel averaging of the per-rank gradients); per-module
clipping on FSDP2 (DTensor) parameters gives the single-process norms and clipped gradients."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses import SoftmaxCenter, koleo_loss, sinkhorn_knopp
from pretrain.optim import clip_grad_per_module
from pretrain.utils import dist as dist_utils

WORLD = 2
ROWS = (6, 4)  # unequal valid rows per rank (Sinkhorn / center); rank 1 pads its buffer to 6


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(sum(ROWS), 12, generator=g) * 3
    extreme = torch.randn(sum(ROWS), 12, generator=g) * 1e4
    feats = torch.randn(8, 6, generator=g)
    feats[6] = feats[1]  # a duplicate across ranks: only the global KoLeo sees it
    return logits, extreme, feats


def _clip_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"backbone": torch.nn.Linear(6, 5), "dino_head": torch.nn.Linear(5, 3)})


def _clip_loss(model, x):
    return model["dino_head"](model["backbone"](x)).pow(2).sum()


def _local_rows(x, rank):
    start = sum(ROWS[:rank])
    local = x[start:start + ROWS[rank]]
    pad = max(ROWS) - local.shape[0]
    return torch.cat([local, torch.full((pad, x.shape[1]), 1e6)]) if pad else local  # padding must be ignored


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert dist_utils.is_dist() and dist_utils.world_size() == WORLD and dist_utils.rank() == rank
        logits, extreme, feats = _data()
        out = {}
        out["sk"] = sinkhorn_knopp(_local_rows(logits, rank), 0.1, n_samples=ROWS[rank])
        out["sk_extreme"] = sinkhorn_knopp(_local_rows(extreme, rank), 0.04, n_samples=torch.tensor(ROWS[rank]))
        center = SoftmaxCenter(12)
        center.update(_local_rows(logits, rank), n_samples=ROWS[rank])
        center.update(_local_rows(extreme, rank), n_samples=ROWS[rank], async_op=True)
        out["probs"] = center.teacher_probs(logits[:2], 0.07)  # applies the pending async update first
        out["center"] = center.center.clone()
        local = feats[rank * 4:(rank + 1) * 4].clone().requires_grad_()
        loss = koleo_loss(local, distributed=True)
        loss.backward()
        out["koleo"] = loss.detach()
        out["koleo_local"] = koleo_loss(local.detach())
        out["koleo_grad"] = local.grad
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = _clip_model()
        mesh = init_device_mesh("cpu", (WORLD,))
        for sub in model.values():
            fully_shard(sub, mesh=mesh)
        _clip_loss(model, feats[rank * 4:(rank + 1) * 4]).backward()
        out["clip_norms"] = clip_grad_per_module(model, max_norm=1.0)
        out["clip_grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        total = dist_utils.all_reduce_sum_(torch.tensor([float(rank + 1)]))
        out["sum"] = total
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_statistics_equal_single_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    logits, extreme, feats = _data()

    assert [float(o["sum"]) for o in outs] == [3.0, 3.0]
    for key, x, temp in (("sk", logits, 0.1), ("sk_extreme", extreme, 0.04)):
        single = sinkhorn_knopp(x, temp)
        assert torch.isfinite(single).all()
        for r, o in enumerate(outs):
            start = sum(ROWS[:r])
            torch.testing.assert_close(o[key][:ROWS[r]], single[start:start + ROWS[r]], rtol=1e-4, atol=1e-6)
            assert torch.equal(o[key][ROWS[r]:], torch.zeros(max(ROWS) - ROWS[r], 12))

    center = SoftmaxCenter(12)
    center.update(logits)
    center.update(extreme)
    for o in outs:
        torch.testing.assert_close(o["center"], center.center)
        torch.testing.assert_close(o["probs"], center.teacher_probs(logits[:2], 0.07))

    x = feats.clone().requires_grad_()
    single_loss = koleo_loss(x)
    single_loss.backward()
    torch.testing.assert_close(sum(o["koleo"] for o in outs) / WORLD, single_loss.detach())
    grads = torch.cat([o["koleo_grad"] for o in outs]) / WORLD  # DDP / FSDP average gradients over ranks
    torch.testing.assert_close(grads, x.grad)
    model = _clip_model()
    (_clip_loss(model, feats) / WORLD).backward()  # FSDP averages the per-rank gradients
    norms = clip_grad_per_module(model, max_norm=1.0)
    for o in outs:
        assert o["clip_norms"] == {k: pytest.approx(v, rel=1e-5) for k, v in norms.items()}
        for name, p in model.named_parameters():
            torch.testing.assert_close(o["clip_grads"][name], p.grad)
    # the cross-rank duplicate makes the global loss differ from the per-rank local losses
    assert abs(float(sum(o["koleo_local"] for o in outs)) / WORLD - float(single_loss.detach())) > 1.0
