"""collate_multicrop: crop-major layouts, masks from the real block masking and an injected function."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.data.collate import collate_multicrop
from pretrain.data.masking import MaskingConfig, mask_batch, masks_upperbound


def make_samples(b: int, n_local: int, g: int = 28, l: int = 14, labels: bool = True) -> list[dict]:
    """Crop c of sample i is filled with 100 * i + c (locals: 100 * i + 10 + c)."""
    out = []
    for i in range(b):
        s = {"global": [torch.full((3, g, g), 100.0 * i + c) for c in range(2)],
             "local": [torch.full((3, l, l), 100.0 * i + 10 + c) for c in range(n_local)], "key": f"k{i}"}
        if labels:
            s["label"] = i % 3
        out.append(s)
    return out


def test_crop_major_layout_and_real_masks():
    b, n_local = 5, 3
    batch = collate_multicrop(make_samples(b, n_local, g=56), patch_size=7, generator=np.random.default_rng(0))
    gc, lc = batch["global_crops"], batch["local_crops"]
    assert gc.shape == (2 * b, 3, 56, 56) and lc.shape == (n_local * b, 3, 14, 14)
    assert gc.dtype == torch.float32
    for c in range(2):
        for i in range(b):
            assert gc[c * b + i, 0, 0, 0].item() == 100 * i + c
    for c in range(n_local):
        for i in range(b):
            assert lc[c * b + i, 0, 0, 0].item() == 100 * i + 10 + c
    masks = batch["masks"]
    assert masks.shape == (2 * b, 64) and masks.dtype == torch.bool
    per_image = masks.sum(-1)
    assert int((per_image > 0).sum()) == int(2 * b * 0.5)  # half of the global crops are masked
    assert torch.equal(batch["mask_indices"], masks.flatten().nonzero().flatten())
    assert batch["n_masked_patches"].tolist() == [int(per_image.sum())]
    assert batch["masks_weight"].shape == (int(per_image.sum()),)
    assert per_image.max() <= 32 and per_image[per_image > 0].min() >= 4  # ratios within [0.1, 0.5]
    rows = batch["mask_indices"] // 64
    for r in rows.unique():  # weights of one image's masked patches sum to 1
        assert batch["masks_weight"][rows == r].sum().item() == pytest.approx(1.0)
    assert batch["upperbound"] == masks_upperbound(2 * b, 64, MaskingConfig())
    assert int(per_image.sum()) <= batch["upperbound"]
    assert batch["labels"].tolist() == [i % 3 for i in range(b)]
    assert batch["keys"] == [f"k{i}" for i in range(b)]


def test_masks_deterministic_under_generator():
    samples = make_samples(4, 2)
    a = collate_multicrop(samples, patch_size=7, generator=np.random.default_rng([3, 2, 0, 5]))
    b = collate_multicrop(samples, patch_size=7, generator=np.random.default_rng([3, 2, 0, 5]))
    c = collate_multicrop(samples, patch_size=7, generator=np.random.default_rng([3, 2, 0, 6]))
    assert torch.equal(a["masks"], b["masks"]) and not torch.equal(a["masks"], c["masks"])


def test_injected_mask_fn_dtype_and_no_labels_no_locals():
    calls = []

    def every_other(n_images, grid_hw, *, generator):
        calls.append((n_images, grid_hw))
        masks = torch.zeros(n_images, grid_hw[0] * grid_hw[1], dtype=torch.bool)
        masks[::2, :3] = True
        return mask_batch(masks, upperbound=3 * n_images)

    batch = collate_multicrop(make_samples(3, 0, labels=False), patch_size=14, mask_fn=every_other,
                              generator=np.random.default_rng(0), dtype=torch.float16)
    assert calls == [(6, (2, 2))]
    assert batch["global_crops"].dtype == torch.float16 and batch["local_crops"].shape[0] == 0
    assert batch["masks"][::2, :3].all() and batch["n_masked_patches"].item() == 9
    assert batch["masks_weight"].tolist() == pytest.approx([1 / 3] * 9)
    assert "labels" not in batch


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="patch_size"):
        collate_multicrop(make_samples(2, 1), patch_size=5, generator=np.random.default_rng(0))
    bad = make_samples(2, 2)
    bad[1]["local"].pop()
    with pytest.raises(ValueError, match="sample 1"):
        collate_multicrop(bad, patch_size=7, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least one"):
        collate_multicrop([], patch_size=7, generator=np.random.default_rng(0))

    def wrong_shape(n_images, grid_hw, *, generator):
        return mask_batch(torch.zeros(n_images, 3, dtype=torch.bool), upperbound=0)

    with pytest.raises(ValueError, match="mask_fn"):
        collate_multicrop(make_samples(2, 1), patch_size=7, mask_fn=wrong_shape, generator=np.random.default_rng(0))
