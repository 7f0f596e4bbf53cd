"""Block masking: masked-image count, stratified ratios, block sizes, rectangles, determinism, collate fields."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from pretrain.data.masking import (
    MaskingConfig,
    block_mask,
    mask_batch,
    masks_upperbound,
    sample_mask_batch,
    sample_masks,
)


@pytest.mark.parametrize("n_images", [1, 7, 8, 16])
def test_half_of_the_images_are_masked(n_images):
    masks = sample_masks(n_images, (16, 16), generator=np.random.default_rng(n_images))
    assert masks.dtype == torch.bool and masks.shape == (n_images, 256)
    assert int((masks.sum(1) > 0).sum()) == int(n_images * 0.5)


def test_ratios_are_stratified_over_bins():
    rng = np.random.default_rng(0)
    n, n_patches = 8, 256
    bins = np.linspace(0.1, 0.5, 5)
    positions = []
    for _ in range(40):
        masks = sample_masks(n, (16, 16), generator=rng)
        counts = masks.sum(1)
        positions.append(np.flatnonzero(counts.numpy() > 0))
        ordered = sorted(counts.tolist())[n // 2:]  # the 4 masked images, ascending
        for count, lo, hi in zip(ordered, bins[:-1], bins[1:]):
            # one image per bin: the i-th smallest count lies in bin i (block growth may end a few patches short)
            assert int(n_patches * lo) - 8 <= count <= int(n_patches * hi)
    # shuffled: masked images are not always the first ones
    assert len({tuple(p) for p in positions}) > 10


def test_every_masked_region_has_at_least_min_patches():
    rng = np.random.default_rng(1)
    for _ in range(30):
        for mask in sample_masks(8, (16, 16), generator=rng).reshape(-1, 16, 16).numpy():
            labels, n_regions = ndimage.label(mask)
            sizes = np.bincount(labels.ravel())[1:]
            assert n_regions == 0 or sizes.min() >= 4


def test_single_block_is_a_rectangle_with_bounded_aspect():
    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(200):
        mask = block_mask((14, 14), 12, rng, max_num_patches=12)
        labels, n_regions = ndimage.label(mask)
        if n_regions != 1:
            continue
        (rows, cols), = [ndimage.find_objects(labels)[0]]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if h * w == int(mask.sum()):  # one placed rectangle (not overlapping ones)
            assert 4 <= h * w <= 12
            assert 1 / 4 <= h / w <= 4  # log-uniform in [0.3, 3.33] before rounding to whole patches
            checked += 1
    assert checked > 50


def test_deterministic_for_a_seed_and_empty_when_ratio_zero():
    a = sample_masks(6, (8, 12), generator=np.random.default_rng(5))
    b = sample_masks(6, (8, 12), generator=np.random.default_rng(5))
    assert torch.equal(a, b) and a.shape == (6, 96)
    none = sample_masks(4, (8, 8), generator=np.random.default_rng(0), cfg=MaskingConfig(mask_probability=0.0))
    assert not none.any()


def test_mask_batch_fields():
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    batch = mask_batch(masks, upperbound=10)
    assert batch.mask_indices.tolist() == [0, 2, 3, 9]
    torch.testing.assert_close(batch.masks_weight, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert batch.n_masked_patches.tolist() == [4]
    with pytest.raises(ValueError, match="upperbound"):
        mask_batch(masks, upperbound=3)


def test_upperbound_matches_dinov2_and_bounds_every_batch():
    assert masks_upperbound(8, 256) == 51 + 76 + 102 + 128
    rng = np.random.default_rng(3)
    for _ in range(30):
        batch = sample_mask_batch(8, (16, 16), generator=rng)
        assert int(batch.n_masked_patches) <= batch.upperbound == 357
        per_image = torch.zeros(8).index_add_(0, batch.mask_indices // 256, batch.masks_weight)
        torch.testing.assert_close(per_image, (batch.masks.sum(1) > 0).float())  # weights sum to 1 per image


def test_config_validation():
    with pytest.raises(ValueError, match="mask_probability"):
        MaskingConfig(mask_probability=1.5)
    with pytest.raises(ValueError, match="ratio_min"):
        MaskingConfig(ratio_min=0.6, ratio_max=0.5)
    with pytest.raises(ValueError, match="max_aspect"):
        MaskingConfig(min_aspect=0.5, max_aspect=0.4)
    with pytest.raises(ValueError, match="grid_hw"):
        sample_masks(2, (0, 4), generator=np.random.default_rng(0))
