"""Strict loading and export of official DINOv2 checkpoint layouts."""

import json

import pytest
import torch

from pretrain.models import DinoVisionTransformer, backbone_config, build_backbone, export_backbone

from .official_layout import PARAMS_M, official_shapes, random_official_state_dict

ALL = ["vits14", "vitb14", "vitl14", "vitg14", "vits14_reg4", "vitb14_reg4", "vitl14_reg4", "vitg14_reg4"]


@pytest.mark.parametrize("name", ALL)
def test_architecture_matches_official_layout(name):
    with torch.device("meta"):
        model = DinoVisionTransformer(backbone_config(name))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_shapes(name)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    expected = PARAMS_M[name.removesuffix("_reg4")] + (4 * model.embed_dim / 1e6 if name.endswith("_reg4") else 0)
    assert n_params == pytest.approx(expected, abs=0.01)
    assert model.cfg.interpolate_offset == (0.0 if name.endswith("_reg4") else 0.1)
    assert model.cfg.interpolate_antialias == name.endswith("_reg4")


def _roundtrip(name, tmp_path, depth=None):
    sd = random_official_state_dict(name, depth=depth)
    src = tmp_path / f"dinov2_{name}_pretrain.pth"
    torch.save(sd, src)
    overrides = {"depth": depth} if depth else {}
    model = build_backbone(name, weights=str(src), **overrides)
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k
    assert model.cfg.img_size == 518
    out = tmp_path / "export.pth"
    export_backbone(model, str(out))
    exported = torch.load(out, weights_only=True)
    assert list(exported) == list(loaded)  # official key order, no chunk indices
    assert all(torch.equal(exported[k], sd[k]) for k in sd)
    again = build_backbone(None, weights=str(out))  # architecture from the sidecar
    assert all(torch.equal(again.state_dict()[k], sd[k]) for k in sd)
    return model


@pytest.mark.parametrize("name", ["vits14", "vitb14", "vits14_reg4", "vitb14_reg4"])
def test_strict_load_export_roundtrip(name, tmp_path):
    model = _roundtrip(name, tmp_path)
    assert sum(p.numel() for p in model.parameters()) > 20e6


@pytest.mark.parametrize("name", ["vitl14", "vitg14", "vitl14_reg4", "vitg14_reg4"])
def test_strict_load_export_roundtrip_large_two_blocks(name, tmp_path):
    """L and g at full width with 2 blocks (the full depth runs in the slow test below)."""
    _roundtrip(name, tmp_path, depth=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vitl14", "vitg14_reg4"])
def test_strict_load_export_roundtrip_large_full(name, tmp_path):
    _roundtrip(name, tmp_path)


def test_teacher_checkpoint_with_chunked_blocks_and_fsspec(tmp_path):
    sd = random_official_state_dict("vits14", depth=4)
    chunked = {}
    for k, v in sd.items():  # DINOv2 training layout: block_chunks=2 -> blocks.<chunk>.<i>.*, under teacher/backbone.
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{k[len('blocks.'):]}"
        chunked["backbone." + k] = v
    chunked["dino_head.mlp.0.weight"] = torch.zeros(2, 2)
    import fsspec

    with fsspec.open("memory://ckpt/teacher_checkpoint.pth", "wb") as f:
        torch.save({"teacher": chunked}, f)
    model = build_backbone("vits14", weights="memory://ckpt/teacher_checkpoint.pth", depth=4)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


def test_bad_checkpoints_fail_listing_keys(tmp_path):
    sd = random_official_state_dict("vits14", depth=2)
    bad = dict(sd)
    del bad["blocks.1.ls2.gamma"]
    bad["register_tokens"] = torch.zeros(1, 4, 384)
    bad["blocks.0.attn.qkv.weight"] = torch.zeros(10, 384)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as err:
        build_backbone("vits14", weights=str(path), depth=2)
    msg = str(err.value)
    assert "missing keys (1): blocks.1.ls2.gamma" in msg
    assert "unexpected keys (1): register_tokens" in msg
    assert "blocks.0.attn.qkv.weight: checkpoint (10, 384) vs model (1152, 384)" in msg
    # A register checkpoint loaded as a plain model names the key too.
    reg = random_official_state_dict("vits14_reg4", depth=2)
    torch.save(reg, path)
    with pytest.raises(ValueError, match="unexpected keys.*register_tokens"):
        build_backbone("vits14", weights=str(path), depth=2)
    with pytest.raises(ValueError, match="unknown backbone 'vitx14'"):
        build_backbone("vitx14")
    with pytest.raises(ValueError, match="unknown backbone override"):
        build_backbone("vit_test", depht=3)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        build_backbone("vit_test", weights=str(path))


def test_export_sidecar_records_architecture(tmp_path):
    model = build_backbone("vit_test", patch_size=7, img_size=28, num_register_tokens=2)
    export_backbone(model, str(tmp_path / "m.pth"))
    meta = json.loads((tmp_path / "m.pth.json").read_text())
    assert meta["name"] == "vit_test_reg2" and meta["config"]["patch_size"] == 7
    again = build_backbone(None, weights=str(tmp_path / "m.pth"))
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(again.eval()(x), model.eval()(x))
