"""DINO head: official state-dict layout, weight-norm parity with torch's legacy weight_norm, init, composition."""

import warnings

import pytest
import torch
from torch import nn

from pretrain.models.heads import DINOHead, HeadsConfig, WeightNormLinear, build_heads


def test_state_dict_layout_matches_official():
    head = DINOHead(32, out_dim=50, hidden_dim=24, bottleneck_dim=8)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (24, 32), "mlp.0.bias": (24,),
        "mlp.2.weight": (24, 24), "mlp.2.bias": (24,),
        "mlp.4.weight": (8, 24), "mlp.4.bias": (8,),
        "last_layer.weight_g": (50, 1), "last_layer.weight_v": (50, 8),
    }
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert list(DINOHead(4, 6, 5, 3, nlayers=1).state_dict()) == ["mlp.0.weight", "mlp.0.bias", "last_layer.weight_g",
                                                                  "last_layer.weight_v"]


def test_weight_norm_equals_torch_legacy_weight_norm():
    ours = WeightNormLinear(8, 12)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        legacy = torch.nn.utils.weight_norm(nn.Linear(8, 12, bias=False))
    legacy.load_state_dict(ours.state_dict())  # same keys and shapes
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), legacy(x))
    torch.testing.assert_close(ours.weight.norm(dim=1), ours.weight_g.squeeze(1))


def test_init_and_forward():
    torch.manual_seed(0)
    head = DINOHead(64, out_dim=300, hidden_dim=256, bottleneck_dim=32)
    assert torch.equal(head.last_layer.weight_g, torch.ones(300, 1)) and head.last_layer.weight_g.requires_grad
    for lin in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.1)  # trunc_normal(std .02, cut at +-2)
        assert lin.weight.abs().max() <= 2.0
    x = torch.randn(2, 7, 64)
    assert head(x).shape == (2, 7, 300)
    torch.testing.assert_close(head.forward_bottleneck(x).norm(dim=-1), torch.ones(2, 7))
    # with weight_g = 1 and unit bottleneck, logits are cosines: |logit| <= 1
    assert head(x).abs().max() <= 1.0 + 1e-5


def test_weight_g_is_trained_and_bf16_autocast():
    head = DINOHead(16, out_dim=40, hidden_dim=32, bottleneck_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, 16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().pow(2).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_g.grad.abs().sum() > 0


def test_build_heads_tied_and_untied():
    shared = build_heads(HeadsConfig(out_dim=20, hidden_dim=16, bottleneck_dim=4), in_dim=8)
    assert list(shared) == ["dino_head"]
    cfg = HeadsConfig(out_dim=20, hidden_dim=16, bottleneck_dim=4, separate_ibot_head=True, ibot_out_dim=30,
                      ibot_hidden_dim=12, ibot_bottleneck_dim=6)
    untied = build_heads(cfg, in_dim=8)
    assert untied["ibot_head"].out_dim == 30 and untied["ibot_head"].bottleneck_dim == 6
    assert untied["dino_head"] is not untied["ibot_head"]
    with pytest.raises(ValueError, match="heads.out_dim"):
        HeadsConfig(out_dim=0)
    with pytest.raises(ValueError, match="bottleneck_dim"):
        DINOHead(8, bottleneck_dim=0)
