"""Mask generators: exact counts, ascending unique ids, whole blocks, crop windows, per-sample ratios, seeds."""

from __future__ import annotations

import pytest
import torch

import maskdm_kernels as mk
from maskdm import masking


def rows_of(vis: mk.Visible) -> list[list[int]]:
    cu = vis.cu_seqlens.tolist()
    ids = vis.ids.tolist()
    return [ids[cu[b]:cu[b + 1]] for b in range(vis.batch_size)]


def check_layout(vis: mk.Visible, B: int, N: int) -> list[list[int]]:
    assert vis.ids.dtype == torch.int32 and vis.cu_seqlens.dtype == torch.int32
    assert vis.batch_size == B and vis.num_patches == N
    assert vis.cu_seqlens[0] == 0 and vis.cu_seqlens[-1] == vis.total
    rows = rows_of(vis)
    for r in rows:
        assert r == sorted(set(r)), "ids must be ascending and unique within a sample"
        assert all(0 <= i < N for i in r)
    assert vis.max_seqlen == max(len(r) for r in rows)
    if vis.uniform:
        assert len({len(r) for r in rows}) == 1
    return rows


@pytest.mark.parametrize("grid,ratio", [(8, 0.5), ((4, 6), 0.75), (16, 0.9), (5, 0.0), (7, 0.33)])
def test_random_patches_exact_count(grid, ratio):
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    N = rows * cols
    vis = masking.random_patches(6, grid, ratio, generator=torch.Generator().manual_seed(0))
    kept = check_layout(vis, 6, N)
    assert vis.uniform
    assert all(len(r) == N - int(ratio * N) for r in kept)
    assert len({tuple(r) for r in kept}) > 1 or N - int(ratio * N) in (0, N)  # samples differ


def test_random_patches_is_uniform_over_patches():
    vis = masking.random_patches(2000, 4, 0.75, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(vis.ids.long(), minlength=16).float() / 2000  # each patch kept w.p. 4/16
    assert (freq - 0.25).abs().max() < 0.04


@pytest.mark.parametrize("grid,block,ratio", [(16, 4, 0.9), (64, 4, 0.9), ((8, 12), 2, 0.5), (8, 4, 0.75), (8, 1, 0.3)])
def test_block_patches_whole_blocks(grid, block, ratio):
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    N = rows * cols
    vis = masking.block_patches(5, grid, ratio, block_size=block, generator=torch.Generator().manual_seed(1))
    kept = check_layout(vis, 5, N)
    masked_blocks = int(ratio * N) // block ** 2
    assert all(len(r) == N - masked_blocks * block ** 2 for r in kept)
    for r in kept:
        blocks = {}
        for i in r:
            key = (i // cols // block, i % cols // block)
            blocks[key] = blocks.get(key, 0) + 1
        assert all(c == block * block for c in blocks.values()), "a block is partly kept"


def test_block_patches_paper_example():
    # 256x256, p=4, block 4, 90%: 230 of 256 blocks masked, 416 patches visible.
    vis = masking.block_patches(2, 64, 0.9)
    assert vis.max_seqlen == 416 and vis.total == 832
    # 32x32, p=2, block 4, 90% (the CPU benchmark): 14 of 16 blocks masked, 87.5%.
    assert masking.block_patches(2, 16, 0.9).max_seqlen == 32


def test_block_size_must_divide_grid():
    with pytest.raises(ValueError, match=r"block_size=4 must divide the patch grid 10x10"):
        masking.block_patches(2, 10, 0.5, block_size=4)
    with pytest.raises(ValueError, match="block_size=3 must divide"):
        masking.block_patches(2, (6, 8), 0.5, block_size=3)


@pytest.mark.parametrize("grid,crop", [(8, 3), (16, 8), ((6, 9), (2, 5)), (4, 4)])
def test_crop_patches_windows(grid, crop):
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    vis = masking.crop_patches(400, grid, crop, generator=torch.Generator().manual_seed(2))
    kept = check_layout(vis, 400, rows * cols)
    assert vis.uniform and vis.max_seqlen == ch * cw
    tops, lefts = set(), set()
    for r in kept:
        top, left = r[0] // cols, r[0] % cols
        assert r == [(top + i) * cols + left + j for i in range(ch) for j in range(cw)]
        assert top + ch <= rows and left + cw <= cols
        tops.add(top)
        lefts.add(left)
    assert tops == set(range(rows - ch + 1)) and lefts == set(range(cols - cw + 1))  # every offset occurs


@pytest.mark.parametrize("kind", ["random", "block"])
def test_per_sample_ratio_within_bounds(kind):
    low, high, N, B = 0.3, 0.9, 256, 64
    g = torch.Generator().manual_seed(4)
    if kind == "random":
        vis = masking.random_patches(B, 16, (low, high), generator=g)
        lo_len, hi_len = N - int(high * N), N - int(low * N)
    else:
        vis = masking.block_patches(B, 16, (low, high), block_size=2, generator=g)
        lo_len, hi_len = N - int(high * N) // 4 * 4, N - int(low * N) // 4 * 4
    kept = check_layout(vis, B, N)
    lengths = [len(r) for r in kept]
    assert not vis.uniform and len(set(lengths)) > 5
    assert all(lo_len <= n <= hi_len for n in lengths)
    assert vis.max_seqlen == max(lengths)
    assert vis.lengths.tolist() == lengths


@pytest.mark.parametrize("make", [
    lambda g: masking.random_patches(4, 8, 0.6, generator=g),
    lambda g: masking.random_patches(4, 8, (0.1, 0.8), generator=g),
    lambda g: masking.block_patches(4, 8, (0.1, 0.8), block_size=2, generator=g),
    lambda g: masking.crop_patches(4, 8, 3, generator=g),
])
def test_deterministic_under_a_seeded_generator(make):
    a, b = make(torch.Generator().manual_seed(7)), make(torch.Generator().manual_seed(7))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    g = torch.Generator().manual_seed(7)
    first, second = make(g), make(g)  # the generator advances
    assert not torch.equal(first.ids, second.ids) or not torch.equal(first.cu_seqlens, second.cu_seqlens)


@pytest.mark.parametrize("make", [
    lambda d: masking.random_patches(4, 8, 0.6, device=d),
    lambda d: masking.random_patches(4, 8, (0.1, 0.8), device=d),
    lambda d: masking.block_patches(4, 8, (0.1, 0.8), block_size=2, device=d),
    lambda d: masking.crop_patches(4, 8, 3, device=d),
])
def test_no_host_sync(make):
    """On the meta device no tensor value can be read back: a generator that synced would fail here."""
    vis = make("meta")
    assert vis.ids.device.type == "meta" and vis.cu_seqlens.device.type == "meta"
    assert vis.max_seqlen > 0 and vis.total > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
        masking.random_patches(2, 8, 1.0)
    with pytest.raises(ValueError, match="low <= high"):
        masking.random_patches(2, 8, (0.8, 0.2))
    with pytest.raises(ValueError, match="crop_size 9x9 must fit"):
        masking.crop_patches(2, 8, 9)
    with pytest.raises(TypeError, match="grid_size"):
        masking.block_patches(2, 8.0, 0.5)
    with pytest.raises(ValueError, match="batch_size"):
        masking.random_patches(0, 8, 0.5)


@pytest.mark.parametrize("kind,grid,block,ratio", [("random", 8, 1, (0.5, 0.9)), ("block", 16, 4, (0.75, 0.95)),
                                                   ("block", (8, 12), 2, (0.1, 0.6)), ("random", 6, 1, (0.3, 0.3))])
def test_pad_to_capacity_fixed_shapes(kind, grid, block, ratio):
    """Every draw of a ratio range pads to the same shapes; real samples are untouched, fillers hold the rest in
    sequences of at most max_seqlen tokens with valid, ascending ids."""
    B = 7
    cap = masking.static_capacity(B, grid, ratio, block_size=block)
    g = torch.Generator().manual_seed(3)
    shapes = set()
    for _ in range(6):
        vis = (masking.random_patches(B, grid, ratio, generator=g) if kind == "random"
               else masking.block_patches(B, grid, ratio, block_size=block, generator=g))
        pad = masking.pad_to_capacity(vis, cap)
        shapes.add((pad.total, pad.batch_size, pad.max_seqlen, pad.uniform))
        got = rows_of(pad)
        assert got[:B] == rows_of(vis)
        assert sum(len(r) for r in got[B:]) == cap.tokens - vis.total
        for r in got[B:]:
            assert len(r) <= cap.max_seqlen and r == list(range(len(r)))  # valid ids: max_seqlen <= N
        assert vis.max_seqlen <= cap.max_seqlen
    assert shapes == {(cap.tokens, B + cap.fillers, cap.max_seqlen, False)}


def test_pad_to_capacity_rejects_a_layout_that_does_not_fit():
    cap = masking.static_capacity(4, 8, (0.5, 0.75))
    with pytest.raises(ValueError, match="does not fit the capacity"):
        masking.pad_to_capacity(masking.random_patches(4, 8, 0.25), cap)  # keeps more than the range allows
    with pytest.raises(ValueError, match="batch 5"):
        masking.pad_to_capacity(masking.random_patches(5, 8, 0.6), cap)


def test_slack_capacity_fits_most_draws_and_the_guaranteed_one_fits_all():
    B, grid, ratio = 16, 8, (0.25, 0.9)
    tight = masking.static_capacity(B, grid, ratio, slack=0.0)  # the mean: about half the draws exceed it
    full = tight.guaranteed()
    assert full == masking.static_capacity(B, grid, ratio) and tight.tokens < full.tokens
    assert tight.max_seqlen == full.max_seqlen and tight.fillers < full.fillers
    g = torch.Generator().manual_seed(0)
    fits = 0
    for _ in range(20):
        vis = masking.random_patches(B, grid, ratio, generator=g)
        assert masking.pad_to_capacity(vis, full).total == full.tokens
        if tight.fits(vis):
            fits += 1
            assert masking.pad_to_capacity(vis, tight).total == tight.tokens
        else:
            with pytest.raises(ValueError, match="cap.guaranteed"):
                masking.pad_to_capacity(vis, tight)
    assert 0 < fits < 20
    slack4 = masking.static_capacity(B, grid, ratio, slack=4.0)
    assert tight.tokens < slack4.tokens <= full.tokens
