"""Masking keeps exactly the requested ratio; block masking masks whole cubes; restore is exact."""

from __future__ import annotations

import pytest
import torch

from umit.ssl.masking import block_masking, num_keep, random_masking


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_masking_exact_ratio_and_restore(ratio):
    g = torch.Generator().manual_seed(0)
    B, L = 4, 64
    m = random_masking(B, L, ratio, generator=g)
    k = num_keep(L, ratio)
    assert m.keep.shape == (B, k)
    assert torch.all(m.mask.sum(1) == L - k)  # every sample masks exactly L - k tokens
    assert torch.all(m.keep[:, 1:] > m.keep[:, :-1])  # sorted, unique
    assert torch.all(m.mask.gather(1, m.keep) == 0)
    # [visible, masked] layout -> raster order via restore
    tokens = torch.arange(L).expand(B, L)
    visible = tokens.gather(1, m.keep)
    masked = torch.stack([torch.nonzero(m.mask[b]).flatten() for b in range(B)])
    layout = torch.cat([visible, masked], dim=1)
    assert torch.equal(layout.gather(1, m.restore), tokens)


def test_samples_differ_and_seed_reproduces():
    a = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(1))
    b = random_masking(2, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.keep, b.keep) and not torch.equal(a.keep[0], a.keep[1])


def test_block_masking_masks_whole_cubes():
    g = torch.Generator().manual_seed(0)
    grid = (6, 6, 4)
    m = block_masking(3, grid, 0.75, block=2, generator=g)
    L = 6 * 6 * 4
    assert torch.all(m.mask.sum(1) == L - num_keep(L, 0.75))
    cubes = m.mask.reshape(3, 3, 2, 3, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(3, 18, 8)
    partial = ((cubes.sum(-1) > 0) & (cubes.sum(-1) < 8)).sum(1)
    assert torch.all(partial <= 1)  # at most one cube per sample is split by the exact ratio


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_ratio(bad):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 8, bad)


def test_bad_block():
    with pytest.raises(ValueError, match="block"):
        block_masking(1, (4, 4, 4), 0.5, block=0)
