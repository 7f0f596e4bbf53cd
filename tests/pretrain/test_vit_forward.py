"""ViT forward semantics against an independent functional reference of the official DINOv2 model."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.layers import attention as attn_mod
from pretrain.layers import resolve_backend
from pretrain.models import build_backbone

from .official_layout import random_official_state_dict


def reference_forward(sd, x, *, heads, reg, offset, antialias, masks=None, ffn="mlp"):
    """DINOv2 ViT written out functionally from the paper/official layout (eval mode, fp32)."""
    b = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    h0, w0 = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    if masks is not None:
        t = torch.where(masks[..., None], sd["mask_token"][None], t)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1)
    pos = sd["pos_embed"]
    m = int(math.isqrt(pos.shape[1] - 1))
    if not (h0 * w0 == m * m and h0 == w0):
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if offset:
            grid = F.interpolate(grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic",
                                 antialias=antialias)
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=antialias)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], 1)
    t = t + pos
    if reg:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    dim = t.shape[-1]
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = (y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, -1, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1) @ v
        a = a.transpose(1, 2).reshape(b, -1, dim) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        t = t + a * sd[p + "ls1.gamma"]
        y = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        if ffn == "mlp":
            y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].T
            y = y + sd[p + "mlp.fc2.bias"]
        else:
            u, g = (y @ sd[p + "mlp.w12.weight"].T + sd[p + "mlp.w12.bias"]).chunk(2, -1)
            y = (F.silu(u) * g) @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
        t = t + y * sd[p + "ls2.gamma"]
    n = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return {"cls": n[:, 0], "reg": n[:, 1 : 1 + reg], "patch": n[:, 1 + reg :], "prenorm": t}


@pytest.fixture(scope="module")
def vits_plain(tmp_path_factory):
    sd = random_official_state_dict("vits14", depth=3, seed=1)
    path = tmp_path_factory.mktemp("w") / "plain.pth"
    torch.save(sd, path)
    return sd, build_backbone("vits14", weights=str(path), depth=3).eval()


@pytest.fixture(scope="module")
def vits_reg(tmp_path_factory):
    sd = random_official_state_dict("vits14_reg4", depth=3, seed=2)
    path = tmp_path_factory.mktemp("w") / "reg.pth"
    torch.save(sd, path)
    return sd, build_backbone("vits14_reg4", weights=str(path), depth=3).eval()


@pytest.mark.parametrize("size", [(224, 224), (280, 420), (518, 518)])
@pytest.mark.parametrize("variant", ["plain", "reg"])
def test_features_equal_reference(size, variant, vits_plain, vits_reg):
    sd, model = vits_plain if variant == "plain" else vits_reg
    reg = 4 if variant == "reg" else 0
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.forward_features(x)
        ref = reference_forward(sd, x, heads=6, reg=reg, offset=0.0 if reg else 0.1, antialias=bool(reg))
    assert (out["x_norm_clstoken"] - ref["cls"]).abs().max() <= 1e-4
    assert (out["x_norm_patchtokens"] - ref["patch"]).abs().max() <= 1e-4
    if reg:
        assert (out["x_norm_regtokens"] - ref["reg"]).abs().max() <= 1e-4
    assert (out["x_prenorm"] - ref["prenorm"]).abs().max() <= 1e-4
    assert out["x_norm_patchtokens"].shape == (2, size[0] // 14 * size[1] // 14, 384)
    assert out["x_norm_regtokens"].shape == (2, reg, 384)


def test_swiglu_giant_block_equals_reference(tmp_path):
    sd = random_official_state_dict("vitg14", depth=1, seed=3)
    torch.save(sd, tmp_path / "g.pth")
    model = build_backbone("vitg14", weights=str(tmp_path / "g.pth"), depth=1).eval()
    x = torch.randn(1, 3, 112, 98)
    with torch.no_grad():
        ours = model.forward_features(x)["x_norm_clstoken"]
        ref = reference_forward(sd, x, heads=24, reg=0, offset=0.1, antialias=False, ffn="swiglu")["cls"]
    assert (ours - ref).abs().max() <= 1e-4


def test_interpolation_modes(vits_plain, vits_reg):
    _, plain = vits_plain
    _, reg = vits_reg
    assert plain.interpolate_pos_encoding(37 * 37, 518, 518) is plain.pos_embed  # native size: untouched
    grid = plain.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    want_plain = F.interpolate(grid, scale_factor=(16.1 / 37, 20.1 / 37), mode="bicubic", antialias=False)
    got = plain.interpolate_pos_encoding(16 * 20, 224, 280)[:, 1:].reshape(1, 16, 20, -1).permute(0, 3, 1, 2)
    assert torch.allclose(got, want_plain, atol=1e-6)
    grid_r = reg.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    want_reg = F.interpolate(grid_r, size=(16, 20), mode="bicubic", antialias=True)
    got_r = reg.interpolate_pos_encoding(16 * 20, 224, 280)[:, 1:].reshape(1, 16, 20, -1).permute(0, 3, 1, 2)
    assert torch.allclose(got_r, want_reg, atol=1e-6)
    # The two official modes really differ, so picking the wrong one would be visible.
    other = F.interpolate(grid, size=(16, 20), mode="bicubic", antialias=True)
    assert (other - want_plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="multiple of the patch size"):
        plain(torch.randn(1, 3, 225, 224))


def test_masked_forward(vits_plain):
    sd, model = vits_plain
    x = torch.randn(2, 3, 224, 224)
    masks = torch.zeros(2, 256, dtype=torch.bool)
    masks[0, :40] = True
    masks[1, 100:180] = True
    with torch.no_grad():
        out = model.forward_features(x, masks=masks)
        ref = reference_forward(sd, x, heads=6, reg=0, offset=0.1, antialias=False, masks=masks)
        # Pixels under a masked patch cannot influence anything.
        x2 = x.clone()
        x2[0, :, :28, :] = 5.0  # patches 0..31 of image 0 are masked
        out2 = model.forward_features(x2, masks=masks)
    assert out["masks"] is masks
    assert (out["x_norm_patchtokens"] - ref["patch"]).abs().max() <= 1e-4
    assert torch.allclose(out["x_prenorm"], out2["x_prenorm"], atol=1e-6)
    with pytest.raises(ValueError, match="masks must have shape"):
        model.forward_features(x, masks=masks[:, :10])


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_packed_multicrop_equals_separate(backend):
    torch.manual_seed(0)
    model = build_backbone("vit_test", num_register_tokens=2, attn_backend=backend).eval()
    g = torch.randn(4, 3, 56, 56)
    loc = torch.randn(6, 3, 28, 28)
    masks = torch.rand(4, 16) < 0.3
    with torch.no_grad():
        packed = model.forward_features_list([g, loc], [masks, None])
        sep = [model.forward_features(g, masks), model.forward_features(loc)]
    for p, s in zip(packed, sep):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert p[key].shape == s[key].shape
            assert (p[key] - s[key]).abs().max() <= 1e-5, key


def test_backends_agree_and_gradients_flow():
    torch.manual_seed(0)
    model = build_backbone("vit_test")
    x = torch.randn(3, 3, 56, 42)
    outs = {}
    for backend in ("sdpa", "math"):
        model.set_attn_backend(backend)
        outs[backend] = model(x)
    assert torch.allclose(outs["sdpa"], outs["math"], atol=1e-5)
    outs["sdpa"].sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "mask_token")


def test_backend_fallback_without_xformers(monkeypatch):
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: False)
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "sdpa"
    with pytest.raises(RuntimeError, match="xformers is not importable.*gpu extra"):
        resolve_backend("xformers", torch.device("cuda"))
    model = build_backbone("vit_test", attn_backend="xformers")
    with pytest.raises(RuntimeError, match="xformers"):
        model(torch.randn(1, 3, 56, 56))
    # Even with xformers importable, CPU tensors fall back (auto) or fail clearly (explicit).
    monkeypatch.setattr(attn_mod, "xformers_available", lambda: True)
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "xformers"
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        build_backbone("vit_test", attn_backend="flash")


def test_drop_path_runs_branch_on_a_subset():
    torch.manual_seed(0)
    model = build_backbone("vit_test", drop_path_rate=0.5, init_values=1.0)
    blk = model.blocks[0]
    with torch.no_grad():
        blk.ls2.gamma.zero_()  # isolate the attention branch
    seen = []
    orig = blk.attn.forward
    blk.attn.forward = lambda x, layout=None: (seen.append(list(layout)), orig(x, layout))[1]
    x = torch.randn(8, 17, 32)
    loc = torch.randn(6, 5, 32)
    blk.train()
    out, out_loc = blk([x, loc])
    assert seen[-1] == [(4, 17), (3, 5)]  # int(8 * 0.5), int(6 * 0.5) images per group
    changed = (out - x).abs().flatten(1).max(1).values > 0
    assert changed.sum() == 4 and ((out_loc - loc).abs().flatten(1).max(1).values > 0).sum() == 3
    blk.eval()
    with torch.no_grad():
        full_branch = blk([x])[0] - x  # eval mode: every image, unscaled
    # Selected images get the branch scaled by B / subset = 2; the others pass through untouched.
    assert torch.allclose((out - x)[changed], 2 * full_branch[changed], atol=1e-5)
    assert torch.equal(out[~changed], x[~changed])
    # Gradients reach the parameters through the subset path.
    blk.train()
    blk([x.requires_grad_()])[0].sum().backward()
    assert blk.attn.qkv.weight.grad.abs().sum() > 0


def test_get_intermediate_layers():
    torch.manual_seed(0)
    model = build_backbone("vit_test", num_register_tokens=4, depth=3).eval()
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        feats = model.forward_features(x)
        last = model.get_intermediate_layers(x, n=1)
        four = model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True)
        raw = model.get_intermediate_layers(x, n=2, norm=False)
    assert len(last) == 1 and torch.allclose(last[0], feats["x_norm_patchtokens"], atol=1e-6)
    assert four[1][0].shape == (2, 32, 4, 5) and four[1][1].shape == (2, 32)
    assert torch.allclose(four[1][1], feats["x_norm_clstoken"], atol=1e-6)
    assert torch.allclose(raw[1], feats["x_prenorm"][:, 5:], atol=1e-6)
    with pytest.raises(ValueError, match="selects blocks outside"):
        model.get_intermediate_layers(x, n=5)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = build_backbone("vit_test").eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert 0 < (low.float() - ref).abs().max() < 0.1  # matmuls ran in bf16, close to fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_packed_matches_sdpa_on_gpu():
    pytest.importorskip("xformers.ops")
    torch.manual_seed(0)
    model = build_backbone("vit_test", depth=2).cuda().eval()
    g, loc = torch.randn(4, 3, 56, 56, device="cuda"), torch.randn(8, 3, 28, 28, device="cuda")
    with torch.no_grad():
        model.set_attn_backend("xformers")
        a = model.forward_features_list([g, loc])
        model.set_attn_backend("sdpa")
        b = model.forward_features_list([g, loc])
    for p, s in zip(a, b):
        assert (p["x_norm_clstoken"] - s["x_norm_clstoken"]).abs().max() < 1e-4
