"""Student/teacher meta-architecture: loss composition, gradient flow, teacher isolation, EMA."""

import numpy as np
import pytest
import torch

from pretrain.data.masking import sample_mask_batch
from pretrain.models.heads import HeadsConfig
from pretrain.ssl.meta_arch import BackboneConfig, LossConfig, SSLMetaArch

HEADS = HeadsConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def make_batch(b=4, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mb = sample_mask_batch(2 * b, (4, 4), generator=np.random.default_rng(seed))
    return {"global_crops": torch.randn(2 * b, 3, 56, 56, generator=g),
            "local_crops": torch.randn(n_local * b, 3, 28, 28, generator=g),
            "masks": mb.masks, "mask_indices": mb.mask_indices, "masks_weight": mb.masks_weight}


def make(loss=None, heads=HEADS, drop_path=0.2):
    torch.manual_seed(0)
    return SSLMetaArch(BackboneConfig(name="vit_test", drop_path_rate=drop_path), heads, loss or LossConfig())


def test_losses_compose_and_gradients_reach_only_the_student():
    arch = make().train()
    total, out = arch.compute_losses(make_batch(), teacher_temp=0.04)
    parts = out["losses"]
    assert set(parts) == {"dino", "ibot", "koleo", "total"}
    assert torch.isfinite(total)
    assert torch.allclose(total.detach(), parts["dino"] + parts["ibot"] + 0.1 * parts["koleo"])
    assert float(parts["dino"]) > 0 and float(parts["ibot"]) > 0
    total.backward()
    grads = {n: p.grad for n, p in arch.student.named_parameters()}
    assert all(g is not None for n, g in grads.items() if "mask_token" not in n)
    assert grads["backbone.mask_token"] is not None  # masked globals use the mask token
    assert all(p.grad is None and not p.requires_grad for p in arch.teacher.parameters())


def test_teacher_sees_only_globals_and_never_drops_paths():
    arch = make(drop_path=0.5).train()
    assert arch.student.training and not arch.teacher.training
    assert all(b.drop_path == 0.0 for b in arch.teacher["backbone"].blocks)
    assert all(b.drop_path == 0.5 for b in arch.student["backbone"].blocks)
    shapes = []
    arch.teacher["backbone"].patch_embed.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(a[0].shape)),
                                                       with_kwargs=True)
    arch.compute_losses(make_batch(b=3), teacher_temp=0.04)
    assert shapes == [(6, 3, 56, 56)]


@pytest.mark.parametrize("loss", [
    LossConfig(ibot_weight=0.0),                      # plain DINO
    LossConfig(dino_weight=0.0, koleo_weight=0.0),    # plain iBOT
    LossConfig(centering="sinkhorn"),
])
def test_switchable_terms(loss):
    arch = make(loss).train()
    total, out = arch.compute_losses(make_batch(), teacher_temp=0.07)
    assert torch.isfinite(total)
    assert ("ibot" in out["losses"]) == (loss.ibot_weight > 0)
    assert ("dino" in out["losses"]) == (loss.dino_weight > 0)
    total.backward()


def test_separate_ibot_head_and_no_local_crops():
    heads = HeadsConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, separate_ibot_head=True, ibot_out_dim=48)
    arch = make(heads=heads).train()
    assert set(arch.student) == {"backbone", "dino_head", "ibot_head"}
    batch = make_batch(n_local=0)
    total, out = arch.compute_losses(batch, teacher_temp=0.04)
    total.backward()
    assert arch.student["ibot_head"].last_layer.weight_v.grad is not None
    assert arch.ibot_center.center.shape == (1, 48)


def test_ema_update():
    arch = make()
    with torch.no_grad():
        for p in arch.student.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in arch.teacher.parameters()]
    arch.update_teacher(0.75)
    for t_before, t_after, s in zip(t0, arch.teacher.parameters(), arch.student.parameters()):
        assert torch.allclose(t_after, 0.75 * t_before + 0.25 * s, atol=1e-6)


def test_config_errors_name_fields():
    with pytest.raises(ValueError, match="loss.centering"):
        LossConfig(centering="kmeans")
    with pytest.raises(ValueError, match="nothing to train"):
        LossConfig(dino_weight=0, ibot_weight=0)
    with pytest.raises(ValueError, match="backbone.drop_path_rate"):
        BackboneConfig(drop_path_rate=1.5)
