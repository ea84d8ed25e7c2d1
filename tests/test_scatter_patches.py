import pytest
import torch

import maskdm_kernels as mk
from maskdm_kernels import reference as ref

from .utils import BACKENDS, DTYPES, TOLS, assert_close, make_visible, skip_unless_available

CASES = [(3, 4, 16, 24, "uniform"), (1, 2, 6, 10, "varlen"), (3, 1, 5, 7, "varlen"), (3, 8, 16, 8, "full"),
         (1, 4, 8, 12, "one")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "C{}p{}_{}x{}_{}".format(*c))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("device,name", BACKENDS)
def test_scatter_matches_reference_and_inverts_gather(device, name, strided, case, dtype):
    skip_unless_available("scatter_patches", name, device, dtype)
    C, p, H, W, layout = case
    B = 5
    vis = make_visible(layout, B, (H // p) * (W // p), device)
    P = p * p * C
    tokens = torch.randn(vis.total, 2 * P if strided else P).to(device=device, dtype=dtype)
    tokens = tokens[:, ::2] if strided else tokens
    with mk.backend(name):
        img = mk.scatter_patches(tokens, vis, p, (H, W), fill=-3.0)
        back = mk.gather_patches(img, vis, p)
    assert img.shape == (B, C, H, W) and img.dtype == dtype and img.is_contiguous()
    assert torch.equal(img, ref.scatter_patches_ref(tokens, vis.ids, vis.cu_seqlens, p, (B, C, H, W), -3.0))
    assert torch.equal(back, tokens)
    covered = int(vis.total) * P
    assert int((img == -3.0).sum()) >= img.numel() - covered


@pytest.mark.parametrize("device,name", BACKENDS)
def test_scatter_gradient_is_a_gather(device, name):
    skip_unless_available("scatter_patches", name, device, torch.float32)
    B, C, H, W, p = 3, 3, 8, 12, 2
    vis = make_visible("varlen", B, 24, device)
    tokens = torch.randn(vis.total, p * p * C, device=device, requires_grad=True)
    g = torch.randn(B, C, H, W, device=device)
    with mk.backend(name):
        (gt,) = torch.autograd.grad(mk.scatter_patches(tokens, vis, p, (H, W)), tokens, g)
    td = tokens.detach().double().requires_grad_()
    (et,) = torch.autograd.grad(ref.scatter_patches_ref(td, vis.ids, vis.cu_seqlens, p, (B, C, H, W)), td, g.double())
    atol, rtol = TOLS[torch.float32]
    assert_close(gt, et, atol, rtol, "d tokens")


def test_scatter_opcheck():
    vis = make_visible("varlen", 3, 16, "cpu")
    tokens = torch.randn(vis.total, 12, requires_grad=True)
    for name in ("torch", "triton", "cpu"):
        skip_unless_available("scatter_patches", name, "cpu", torch.float32)
        with mk.backend(name):
            torch.library.opcheck(torch.ops.maskdm.scatter_patches.default,
                                  (tokens, vis.ids, vis.cu_seqlens, 2, 3, 3, 8, 8, 0.5))


BAD = [
    (lambda t, v: mk.scatter_patches(t[0], v, 2, 8), "tokens"),
    (lambda t, v: mk.scatter_patches(t.long(), v, 2, 8), "tokens"),
    (lambda t, v: mk.scatter_patches(t[:, :11], v, 2, 8), "tokens"),
    (lambda t, v: mk.scatter_patches(t[1:], v, 2, 8), "tokens"),
    (lambda t, v: mk.scatter_patches(t[:, :0], v, 2, 8), "tokens"),
    (lambda t, v: mk.scatter_patches(t, v, 3, 9), "vis.num_patches"),
    (lambda t, v: mk.scatter_patches(t, v, 3, 8), "patch_size"),
    (lambda t, v: mk.scatter_patches(t, v, 2, (8,)), "image_size"),
    (lambda t, v: mk.scatter_patches(t, v, 2, 8.0), "image_size"),
    (lambda t, v: mk.scatter_patches(t, None, 2, 8), "vis"),
]


@pytest.mark.parametrize("call,arg", BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD)])
def test_scatter_bad_inputs_name_the_argument(call, arg):
    vis = make_visible("uniform", 3, 16, "cpu")
    t = torch.randn(vis.total, 12)
    with pytest.raises((ValueError, TypeError)) as e:
        call(t, vis)
    assert f" {arg} " in str(e.value) or f" {arg}=" in str(e.value), str(e.value)
