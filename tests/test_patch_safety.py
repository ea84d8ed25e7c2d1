"""Memory safety and clear errors of the patch ops for any values (issue 13, items 1-2).

On the device backends (Triton here under the interpreter, the torch reference, CUDA on a GPU) an invalid patch id
or a malformed ``cu_seqlens`` gives NaN in the affected outputs, never a wrapped index or a plausible value, and no
host sync. The C++ CPU kernels read the values on the host and raise a ValueError naming the argument.
``Visible.validate()`` / ``validate=True`` name the bad field.
"""

import pytest
import torch

import maskdm_kernels as mk
from maskdm_kernels import reference as ref

from .utils import BACKENDS, DEVICES, skip_unless_available

B, C, H, W, p = 3, 3, 8, 8, 2
N, P = (H // p) * (W // p), p * p * C
IDS = [1, 3, 0, 5, 2, 9]  # two tokens per sample, ascending within each
CU = [0, 2, 4, 6]
BAD = 3  # the token given a bad id below: sample 1's second token


def _vis(ids=IDS, cu=CU, max_seqlen=2, device="cpu"):
    # Straight through the constructor: it checks types and shapes, never values (the case under test).
    return mk.Visible(torch.tensor(ids, dtype=torch.int32, device=device),
                      torch.tensor(cu, dtype=torch.int32, device=device), max_seqlen, N, False)


def _data(device):
    g = torch.Generator().manual_seed(0)
    x, noise = (torch.randn(B, C, H, W, generator=g).to(device) for _ in range(2))
    tokens = torch.randn(len(IDS), P, generator=g).to(device)
    return x, noise, tokens


def _run_all(name, vis, x, noise, tokens):
    with mk.backend(name):
        out = mk.gather_patches(x, vis, p, noise=noise, signal_scale=torch.ones(B, device=x.device),
                                noise_scale=torch.ones(B, device=x.device))
        img = mk.scatter_patches(tokens, vis, p, (H, W))
        pred = tokens.clone().requires_grad_()
        loss = mk.masked_noise_loss(pred, noise, vis, p)
        (grad,) = torch.autograd.grad(loss, pred)
    return out, img, loss, grad


@pytest.mark.parametrize("bad_id", [N, -1, 100000, -(2 ** 31)])
@pytest.mark.parametrize("device,name", BACKENDS)
def test_invalid_patch_id_gives_nan_rows_or_a_named_error(device, name, bad_id):
    skip_unless_available("gather_patches", name, device, torch.float32)
    ids = list(IDS)
    ids[BAD] = bad_id
    vis = _vis(ids, device=device)
    x, noise, tokens = _data(device)
    if name == "cpu":  # the C++ CPU kernels read the values on the host: a named error
        for call in (lambda: mk.gather_patches(x, vis, p), lambda: mk.scatter_patches(tokens, vis, p, H),
                     lambda: mk.masked_noise_loss(tokens, noise, vis, p)):
            with pytest.raises(ValueError, match=r"ids holds a patch id outside \[0, 16\)"), mk.backend(name):
                call()
        return
    out, img, loss, grad = _run_all(name, vis, x, noise, tokens)
    good = [t for t in range(len(IDS)) if t != BAD]
    # The bad token's rows are NaN (never a wrapped index: -1 must not read patch N - 1) ...
    assert torch.isnan(out[BAD]).all() and torch.isnan(grad[BAD]).all() and torch.isnan(loss)
    # ... and every other row is exactly what a valid layout gives.
    ok_vis = _vis(device=device)
    expected = ref.gather_patches_ref(x, ok_vis.ids, ok_vis.cu_seqlens, p, noise)
    assert torch.equal(out[good], expected[good])
    assert torch.isfinite(grad[good]).all()
    # Scatter: the token has nowhere to go, so its sample's image is NaN; the other samples are untouched.
    assert torch.isnan(img[1]).all()
    expected_img = ref.scatter_patches_ref(tokens, ok_vis.ids, ok_vis.cu_seqlens, p, (B, C, H, W))
    assert torch.equal(img[[0, 2]], expected_img[[0, 2]])


@pytest.mark.parametrize("device,name", BACKENDS)
def test_scatter_bad_id_poisons_an_image_that_spans_many_blocks(device, name):
    # Sample 0 keeps all 1024 patches of a 64x64 image (16 Triton programs, 4+ CUDA blocks), its first id bad: the
    # image must come back all NaN, so no later program's valid pixels may land after the NaN (programs run in
    # order under the interpreter, concurrently on a GPU: the poison is a second launch).
    skip_unless_available("scatter_patches", name, device, torch.float32)
    n = (64 // p) ** 2
    ids = list(range(n)) + [5, 7]
    ids[0] = n
    vis = mk.Visible(torch.tensor(ids, dtype=torch.int32, device=device),
                     torch.tensor([0, n, n + 2], dtype=torch.int32, device=device), n, n, False)
    tokens = torch.randn(n + 2, P, generator=torch.Generator().manual_seed(0)).to(device)
    with mk.backend(name):
        if name == "cpu":
            with pytest.raises(ValueError, match=r"ids holds a patch id outside"):
                mk.scatter_patches(tokens, vis, p, 64)
            return
        img = mk.scatter_patches(tokens, vis, p, 64)
    assert torch.isnan(img[0]).all()
    expected = ref.scatter_patches_ref(tokens[n:], vis.ids[n:].contiguous(),
                                       torch.tensor([0, 0, 2], dtype=torch.int32, device=device), p, (2, C, 64, 64))
    assert torch.equal(img[1], expected[1])


BAD_CU = {
    "not_starting_at_0": [1, 2, 4, 6],
    "decreasing": [0, 4, 2, 6],
    "ending_past_T": [0, 2, 4, 7],
    "ending_before_T": [0, 2, 4, 5],
    "far_out_of_range": [0, 2, 100000, 6],
}


@pytest.mark.parametrize("case", list(BAD_CU))
@pytest.mark.parametrize("device,name", BACKENDS)
def test_malformed_cu_seqlens_gives_nan_or_a_named_error(device, name, case):
    skip_unless_available("gather_patches", name, device, torch.float32)
    vis = _vis(cu=BAD_CU[case], device=device)
    x, noise, tokens = _data(device)
    if name == "cpu":
        for call in (lambda: mk.gather_patches(x, vis, p), lambda: mk.scatter_patches(tokens, vis, p, H),
                     lambda: mk.masked_noise_loss(tokens, noise, vis, p)):
            with pytest.raises(ValueError, match="cu_seqlens"), mk.backend(name):
                call()
        return
    out, img, loss, grad = _run_all(name, vis, x, noise, tokens)
    assert torch.isnan(out).all() and torch.isnan(img).all() and torch.isnan(loss) and torch.isnan(grad).all()


@pytest.mark.parametrize("device,name", BACKENDS)
def test_no_token_with_a_malformed_cu_seqlens_is_nan(device, name):
    skip_unless_available("masked_noise_loss", name, device, torch.float32)
    vis = mk.Visible(torch.zeros(0, dtype=torch.int32, device=device),
                     torch.tensor([0, 2, 2, 2], dtype=torch.int32, device=device), 0, N, False)
    _x, noise, _ = _data(device)
    empty = torch.zeros(0, P, device=device)
    if name == "cpu":
        with pytest.raises(ValueError, match="cu_seqlens"), mk.backend(name):
            mk.masked_noise_loss(empty, noise, vis, p)
        return
    with mk.backend(name):
        assert torch.isnan(mk.masked_noise_loss(empty, noise, vis, p))
        assert torch.isnan(mk.scatter_patches(empty, vis, p, H)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_triton_kernels_with_an_empty_batch_but_tokens_read_nothing_per_sample(device):
    # Visible refuses B = 0 with T > 0 (shapes alone), but the kernels take raw tensors: every per-sample load
    # (scales, weight, cu_seqlens[b + 1]) is masked by the token check, so the (0,) tensors are never read.
    skip_unless_available("gather_patches", "triton", device, torch.float32)
    from maskdm_kernels.ops import patches_triton as pt

    ids, cu = torch.tensor([0, 1], dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device)
    x, none = torch.randn(0, C, H, W, device=device), torch.zeros(0, device=device)
    pred = torch.randn(2, P, device=device)
    assert torch.isnan(pt.gather_patches(x, ids, cu, p, x, none, none)).all()
    assert torch.isnan(pt.masked_noise_loss(pred, x, ids, cu, p, none))
    assert torch.isnan(pt.masked_noise_loss_backward(torch.ones((), device=device), pred, x, ids, cu, p, none)).all()
    with pytest.raises(ValueError, match=r"cu_seqlens has one entry \(B = 0\) but ids holds 2 tokens"):
        mk.Visible(ids, cu, 1, N, False)


@pytest.mark.parametrize("device,name", BACKENDS)
def test_nan_inputs_propagate_to_the_same_rows(device, name):
    skip_unless_available("gather_patches", name, device, torch.float32)
    vis = _vis(device=device)
    x, noise, tokens = _data(device)
    # Token 3 is sample 1's patch 5 (row 1, col 1): poison one of its pixels in images; token 0's row in tokens.
    x[1, 2, 3, 3] = float("nan")
    tokens[0, 4] = float("nan")
    out, img, loss, grad = _run_all(name, vis, x, noise, tokens)
    assert torch.isnan(out[BAD]).any() and torch.isfinite(out[[0, 1, 2, 4, 5]]).all()
    assert torch.isnan(img[0]).sum() == 1 and torch.isfinite(img[1:]).all()
    assert torch.isnan(loss)
    assert torch.isnan(grad[0]).any() and torch.isfinite(grad[1:]).all()


def test_unsorted_and_duplicated_ids_are_memory_safe_and_named_by_validate():
    x, _noise, _tokens = _data("cpu")
    for ids, what in (([3, 1, 0, 5, 2, 9], "is not ascending"), ([1, 1, 0, 5, 2, 9], "repeats a patch id")):
        vis = _vis(ids)
        for name in ("torch", "triton", "cpu"):
            skip_unless_available("gather_patches", name, "cpu", torch.float32)
            with mk.backend(name):
                out = mk.gather_patches(x, vis, p)
                with pytest.raises(ValueError, match=f"ids {what} within sample 0"):
                    mk.gather_patches(x, vis, p, validate=True)
            # Each token still reads its own patch (in bounds): the order is a contract, not a safety condition.
            assert torch.equal(out, ref.gather_patches_ref(x, vis.ids, vis.cu_seqlens, p))
        with pytest.raises(ValueError, match=what):
            mk.Visible.from_packed(vis.ids, vis.cu_seqlens, N)
    with pytest.raises(ValueError, match=r"idx\[1\] repeats"):
        mk.Visible.from_index(torch.tensor([[0, 1], [4, 4]]), N)


@pytest.mark.parametrize("field,kwargs", [
    ("cu_seqlens\\[0\\] must be 0", {"cu": [1, 2, 4, 6]}),
    ("non-decreasing", {"cu": [0, 4, 2, 6]}),
    ("cu_seqlens\\[-1\\] must equal T=6", {"cu": [0, 2, 4, 7]}),
    ("ids\\[3\\]=16 is outside", {"ids": [1, 3, 0, 16, 2, 9]}),
    ("ids\\[3\\]=-1 is outside", {"ids": [1, 3, 0, -1, 2, 9]}),
    ("max_seqlen=1 is below the longest sample", {"max_seqlen": 1}),
])
def test_validate_names_the_field(field, kwargs):
    vis = _vis(**kwargs)
    with pytest.raises(ValueError, match=field):
        vis.validate()
    _x, noise, tokens = _data("cpu")
    with mk.backend("torch"), pytest.raises(ValueError, match=field):
        mk.masked_noise_loss(tokens, noise, vis, p, validate=True)
    with mk.backend("torch"), pytest.raises(ValueError, match=field):
        mk.scatter_patches(tokens, vis, p, H, validate=True)
    if "ids" not in kwargs and "max_seqlen" not in kwargs:  # host values: the constructor refuses them too
        with pytest.raises(ValueError, match=field):
            mk.Visible.from_packed(vis.ids, vis.cu_seqlens, N)


def test_max_seqlen_too_small_does_not_change_the_patch_ops():
    # The patch ops never read max_seqlen (each token finds its sample in cu_seqlens): results stay exact.
    x, noise, _ = _data("cpu")
    small, right = _vis(max_seqlen=1), _vis()
    for name in ("torch", "triton"):
        with mk.backend(name):
            assert torch.equal(mk.gather_patches(x, small, p, noise=noise), mk.gather_patches(x, right, p, noise=noise))


@pytest.mark.parametrize("make,arg", [
    (lambda: mk.Visible.from_index(torch.tensor([[0, 16]]), N), "idx\\[0\\] holds a patch id outside"),
    (lambda: mk.Visible.from_index(torch.tensor([[-1, 2]]), N), "idx\\[0\\] holds a patch id outside"),
    (lambda: mk.Visible.full(-1, N), "batch_size"),
    (lambda: mk.Visible.full(2, 0), "num_patches"),
    (lambda: mk.Visible.from_packed(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32),
                                    N), "cu_seqlens\\[-1\\]"),
])
def test_constructors_refuse_bad_host_values(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_validate_names_a_false_uniform_flag():
    vis = mk.Visible(torch.tensor(IDS, dtype=torch.int32), torch.tensor([0, 1, 4, 6], dtype=torch.int32), 3, N, True)
    with pytest.raises(ValueError, match="uniform=True but the samples' lengths differ"):
        vis.validate()


def test_valid_layouts_pass_validate():
    for vis in (mk.Visible.full(2, N), mk.Visible.from_index(torch.tensor([[3, 1], [0, 15]]), N), _vis(),
                mk.Visible.from_mask(torch.tensor([[True, False, True, False], [False, False, False, True]]))):
        assert vis.validate() is vis
