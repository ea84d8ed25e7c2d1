import pytest
import torch

from maskdm_kernels import Visible
from maskdm_kernels.layout import sample_index


def test_from_index_sorts_and_is_uniform():
    idx = torch.tensor([[5, 1, 3], [0, 7, 2]])
    vis = Visible.from_index(idx, 8)
    assert vis.ids.dtype == torch.int32 and vis.cu_seqlens.dtype == torch.int32
    assert vis.ids.tolist() == [1, 3, 5, 0, 2, 7]
    assert vis.cu_seqlens.tolist() == [0, 3, 6]
    assert (vis.batch_size, vis.total, vis.max_seqlen, vis.num_patches, vis.uniform) == (2, 6, 3, 8, True)
    assert vis.lengths.tolist() == [3, 3]
    assert vis.sample_index().tolist() == [0, 0, 0, 1, 1, 1]


def test_from_packed_varlen_and_max_seqlen():
    ids = torch.tensor([4, 0, 1, 2, 3], dtype=torch.int32)
    cu = torch.tensor([0, 1, 1, 5], dtype=torch.int32)
    vis = Visible.from_packed(ids, cu, 6)
    assert vis.max_seqlen == 4 and not vis.uniform and vis.lengths.tolist() == [1, 0, 4]
    assert vis.sample_index().tolist() == [0, 2, 2, 2, 2]
    assert Visible.from_packed(ids, cu, 6, max_seqlen=5).max_seqlen == 5


def test_sample_index_function_matches_lengths_and_traces_without_sync():
    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    idx = sample_index(cu, 6)
    assert idx.dtype == torch.int64 and idx.tolist() == [0, 0, 2, 2, 2, 3]
    assert sample_index(torch.zeros(1, dtype=torch.int32), 0).tolist() == []
    # output_size makes the length static: the meta device (no values at all) still gives the shape.
    assert sample_index(cu.to("meta"), 6).shape == (6,)


def test_from_mask_uses_true_as_masked():
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    vis = Visible.from_mask(mask)
    assert vis.ids.tolist() == [1, 3, 0, 1, 2]
    assert vis.cu_seqlens.tolist() == [0, 2, 5]
    assert vis.max_seqlen == 3 and not vis.uniform and vis.num_patches == 4
    assert Visible.from_mask(torch.tensor([[True, False], [False, True]])).uniform


def test_full_and_to():
    vis = Visible.full(3, 4, "cpu")
    assert vis.ids.tolist() == [0, 1, 2, 3] * 3 and vis.cu_seqlens.tolist() == [0, 4, 8, 12]
    assert vis.uniform and vis.max_seqlen == 4
    moved = vis.to("meta")
    assert moved.ids.device.type == "meta" and moved.max_seqlen == 4 and moved.uniform
    assert "Visible(batch_size=3" in repr(vis)


@pytest.mark.parametrize("make,arg", [
    (lambda: Visible.from_index(torch.zeros(2, 3), 8), "idx"),
    (lambda: Visible.from_index(torch.zeros(6, dtype=torch.long), 8), "idx"),
    (lambda: Visible.from_index(torch.zeros(2, 9, dtype=torch.long), 8), "num_patches"),
    (lambda: Visible.from_packed(torch.zeros(3, dtype=torch.int64), torch.tensor([0, 3], dtype=torch.int32), 4),
     "ids"),
    (lambda: Visible.from_packed(torch.zeros(3, dtype=torch.int32), torch.tensor([0, 3]), 4), "cu_seqlens"),
    (lambda: Visible.from_packed(torch.zeros(3, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 0),
     "num_patches"),
    (lambda: Visible.from_packed(torch.zeros(3, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 4, 9),
     "max_seqlen"),
    (lambda: Visible.from_mask(torch.zeros(2, 4)), "mask"),
])
def test_bad_inputs_name_the_argument(make, arg):
    with pytest.raises((TypeError, ValueError)) as e:
        make()
    assert arg in str(e.value)
