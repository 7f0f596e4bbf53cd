"""Axial 2-D RoPE (DINOv3) as a ViT option: the rotation against an explicit float64 computation, relative-position
invariance, any-resolution forward (packed multi-crop included), training augmentations, backends, and the
learned-embedding path unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.layers.rope import AxialRope, apply_rope
from pretrain.models.vit import DinoVisionTransformer, ViTConfig


def _vit(pe: str = "rope", seed: int = 0, **kw) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    cfg = ViTConfig(embed_dim=48, depth=2, num_heads=3, patch_size=7, img_size=28, pos_embed=pe, **kw)
    return DinoVisionTransformer(cfg).eval()


def test_rotation_equals_explicit_pairwise_rotations():
    rope = AxialRope(8, base=100.0).eval()
    coords = torch.tensor([[0.3, -0.7], [-1.0, 1.0]])
    cos, sin = rope.tables(coords)
    x = torch.randn(2, 8, dtype=torch.float64)
    got = apply_rope(x.float(), cos, sin).double()
    periods = [100.0 ** (2 * k / 4) for k in range(2)]
    for n, (y, xc) in enumerate(coords.double().tolist()):
        angles = [2 * math.pi * y / p for p in periods] + [2 * math.pi * xc / p for p in periods]
        for i, a in enumerate(angles):  # dims i and i + 4 form one rotated pair
            u, v = x[n, i].item(), x[n, i + 4].item()
            assert got[n, i].item() == pytest.approx(u * math.cos(a) - v * math.sin(a), abs=1e-5)
            assert got[n, i + 4].item() == pytest.approx(v * math.cos(a) + u * math.sin(a), abs=1e-5)


def test_scores_depend_only_on_coordinate_differences_and_norms_are_kept():
    rope = AxialRope(16).eval()
    q, k = torch.randn(16), torch.randn(16)
    a, b = torch.tensor([[0.2, -0.4]]), torch.tensor([[-0.5, 0.9]])
    delta = torch.tensor([[0.37, -0.21]])

    def score(pa, pb):
        ca, sa = rope.tables(pa)
        cb, sb = rope.tables(pb)
        return float(apply_rope(q[None], ca, sa) @ apply_rope(k[None], cb, sb).T)

    assert score(a, b) == pytest.approx(score(a + delta, b + delta), abs=1e-4)
    assert score(a, b) != pytest.approx(score(a, b + delta), abs=1e-3)
    c, s = rope.tables(torch.rand(5, 2) * 2 - 1)
    x = torch.randn(5, 16)
    assert torch.allclose(apply_rope(x, c, s).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_grid_coordinates_are_resolution_free():
    rope = AxialRope(8).eval()
    one = rope.coords(4, 4).reshape(4, 4, 2)
    two = rope.coords(8, 8).reshape(8, 8, 2)
    # the 2x grid subdivides the same [-1, 1] box: each 2x2 group of patches is centred on its 1x patch
    assert torch.allclose(two.reshape(4, 2, 4, 2, 2).mean(dim=(1, 3)), one, atol=1e-6)
    assert one.min() > -1 and one.max() < 1 and torch.allclose(one[0, 0], torch.tensor([-0.75, -0.75]))


def test_rope_vit_runs_at_any_resolution_and_packs_crops():
    m = _vit()
    assert m.pos_embed is None and not any("pos_embed" in k for k in m.state_dict())
    x1, x2 = torch.randn(2, 3, 28, 28), torch.randn(3, 3, 70, 42)
    packed = m.forward_features_list([x1, x2])
    for x, out in zip((x1, x2), packed):
        alone = m.forward_features(x)
        assert torch.allclose(out["x_norm_clstoken"], alone["x_norm_clstoken"], atol=1e-5)
        assert out["x_norm_patchtokens"].shape[1] == (x.shape[-2] // 7) * (x.shape[-1] // 7)
    inter = m.get_intermediate_layers(x2, n=1, reshape=True)[0]
    assert inter.shape == (3, 48, 10, 6)


def test_rope_at_twice_the_resolution_stays_close():
    """Documented figure (README): on a real photo and its 2x bicubic upsample, random-init ViTs give CLS cosine
    ~0.98 with RoPE (seeds 0-2: 0.976-0.978 at dim 96) and ~0.98 with interpolated learned embeddings."""
    from PIL import Image
    from skimage import data

    img = np.asarray(Image.fromarray(data.astronaut()).resize((56, 56), Image.BICUBIC), np.float32) / 255
    x = torch.tensor(img).permute(2, 0, 1)[None]
    x = (x - x.mean()) / x.std()
    x2 = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
    for seed in range(2):
        torch.manual_seed(seed)
        m = DinoVisionTransformer(ViTConfig(embed_dim=96, depth=4, num_heads=3, patch_size=7, img_size=56,
                                            pos_embed="rope", init_values=None)).eval()  # fmt: skip
        with torch.no_grad():
            cos = F.cosine_similarity(m(x), m(x2)).item()
        assert cos > 0.95, cos


def test_training_augmentations_are_seeded_and_off_in_eval():
    m = _vit(rope_shift=0.1, rope_jitter=1.5, rope_rescale=2.0, init_values=None)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = m(x)
        m.train()
        torch.manual_seed(5)
        a = m(x)
        torch.manual_seed(5)
        b = m(x)
        m.eval()
        again = m(x)
    assert torch.equal(a, b) and not torch.allclose(a, ref, rtol=1e-3, atol=1e-6) and torch.equal(again, ref)
    with pytest.raises(ValueError, match="jitter"):
        AxialRope(8, jitter=0.5)
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTConfig(embed_dim=30, depth=1, num_heads=5, pos_embed="rope")


def test_backends_agree_and_learned_path_is_unchanged():
    m = _vit()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        m.set_attn_backend("math")
        ref = m(x)
        m.set_attn_backend("sdpa")
        assert torch.allclose(m(x), ref, atol=1e-5)
    learned = _vit("learned")
    assert learned.rope is None and learned.pos_embed.shape == (1, 1 + 16, 48)
    twin = _vit("learned")
    twin.load_state_dict(learned.state_dict(), strict=True)  # same keys as before the option existed
    with torch.no_grad():
        assert torch.equal(twin(x), learned(x))
