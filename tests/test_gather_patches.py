import pytest
import torch

import maskdm_kernels as mk
from maskdm_kernels import reference as ref

from .utils import BACKENDS, DTYPES, TOLS, assert_close, make_images, make_visible, skip_unless_available

# (C, p, H, W, layout): C in {1, 3}, p in {1, 2, 4, 8}, H != W, uniform / varlen / full / one-token layouts.
CASES = [
    (3, 4, 16, 24, "uniform"),
    (1, 2, 6, 10, "varlen"),
    (3, 1, 5, 7, "varlen"),
    (3, 8, 16, 8, "full"),
    (1, 4, 8, 12, "one"),
    (3, 2, 10, 6, "varlen"),
]
FORMATS = ["contiguous", "channels_last", "strided"]


def _scales(B, device):
    g = torch.Generator().manual_seed(3)
    return torch.rand(B, generator=g).to(device), torch.rand(B, generator=g).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "C{}p{}_{}x{}_{}".format(*c))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device,name", BACKENDS)
def test_gather_noised_matches_reference(device, name, fmt, case, dtype):
    skip_unless_available("gather_patches", name, device, dtype)
    C, p, H, W, layout = case
    B = 5
    x = make_images((B, C, H, W), dtype, device, fmt)
    n = make_images((B, C, H, W), dtype, device, "contiguous")
    vis = make_visible(layout, B, (H // p) * (W // p), device)
    ss, ns = _scales(B, device)
    with mk.backend(name):
        out = mk.gather_patches(x, vis, p, noise=n, signal_scale=ss, noise_scale=ns)
        plain = mk.gather_patches(x, vis, p)
    assert out.dtype == dtype and out.shape == (vis.total, p * p * C) and out.is_contiguous()
    expected = ref.gather_patches_ref(x.double(), vis.ids, vis.cu_seqlens, p, n.double(), ss.double(), ns.double())
    atol, rtol = TOLS[dtype]
    assert_close(out, expected, atol, rtol, f"{name} gather+noise")
    # Plain gather is a copy: exact.
    assert torch.equal(plain, ref.gather_patches_ref(x, vis.ids, vis.cu_seqlens, p))


@pytest.mark.parametrize("device,name", BACKENDS)
@pytest.mark.parametrize("which", ["noise_only", "signal_only", "unit_scales"])
def test_gather_optional_scales(device, name, which):
    skip_unless_available("gather_patches", name, device, torch.float32)
    B, C, H, W, p = 3, 3, 8, 8, 2
    x, n = torch.randn(B, C, H, W, device=device), torch.randn(B, C, H, W, device=device)
    vis = make_visible("varlen", B, 16, device)
    ss, _ns = _scales(B, device)
    kwargs = {"noise_only": {"noise": n}, "signal_only": {"signal_scale": ss},
              "unit_scales": {"noise": n, "signal_scale": torch.ones(B, device=device),
                                  "noise_scale": torch.ones(B, device=device)}}[which]
    with mk.backend(name):
        out = mk.gather_patches(x, vis, p, **kwargs)
    expected = ref.gather_patches_ref(x.double(), vis.ids, vis.cu_seqlens, p,
                                      **{k: v.double() for k, v in kwargs.items()})
    assert_close(out, expected, 1e-6, 1e-6, which)


@pytest.mark.parametrize("device,name", BACKENDS)
def test_gather_gradients(device, name):
    skip_unless_available("gather_patches", name, device, torch.float32)
    B, C, H, W, p = 4, 3, 8, 12, 4
    vis = make_visible("varlen", B, 6, device)
    x = torch.randn(B, C, H, W, device=device, requires_grad=True)
    n = torch.randn(B, C, H, W, device=device, requires_grad=True)
    ss, ns = _scales(B, device)
    g = torch.randn(vis.total, p * p * C, device=device)
    with mk.backend(name):
        out = mk.gather_patches(x, vis, p, noise=n, signal_scale=ss, noise_scale=ns)
        gx, gn = torch.autograd.grad(out, (x, n), g)
    xd, nd = x.detach().double().requires_grad_(), n.detach().double().requires_grad_()
    expected = ref.gather_patches_ref(xd, vis.ids, vis.cu_seqlens, p, nd, ss.double(), ns.double())
    ex, en = torch.autograd.grad(expected, (xd, nd), g.double())
    assert_close(gx, ex, 1e-6, 1e-6, "d images")
    assert_close(gn, en, 1e-6, 1e-6, "d noise")
    # Masked pixels get no gradient.
    untouched = mk.scatter_patches(torch.ones_like(g), vis, p, (H, W)) == 0
    assert (gx[untouched] == 0).all()


def test_gather_reads_only_visible_pixels():
    # NaN in every masked pixel must not reach the output.
    B, C, H, W, p = 2, 3, 8, 8, 2
    vis = make_visible("uniform", B, 16, "cpu")
    x = torch.randn(B, C, H, W)
    visible = mk.scatter_patches(torch.ones(vis.total, p * p * C), vis, p, H) == 1
    poisoned = torch.where(visible, x, torch.full_like(x, float("nan")))
    for name in ("torch", "triton"):
        with mk.backend(name):
            out = mk.gather_patches(poisoned, vis, p, noise=poisoned, signal_scale=torch.ones(B),
                                    noise_scale=torch.ones(B))
        assert torch.isfinite(out).all(), name


def test_gather_opcheck():
    B, C, H, W, p = 3, 3, 8, 8, 2
    vis = make_visible("varlen", B, 16, "cpu")
    x = torch.randn(B, C, H, W, requires_grad=True)
    n = torch.randn(B, C, H, W)
    args = (x, vis.ids, vis.cu_seqlens, p, n, torch.rand(B), torch.rand(B))
    for name in ("torch", "triton", "cpu"):
        skip_unless_available("gather_patches", name, "cpu", torch.float32)
        with mk.backend(name):
            torch.library.opcheck(torch.ops.maskdm.gather_patches.default, args)


def test_compiled_kernel_opcheck():
    skip_unless_available("gather_patches", "cpu", "cpu", torch.float32)
    B, C, H, W, p = 3, 3, 8, 8, 2
    vis = make_visible("varlen", B, 16, "cpu")
    args = (torch.randn(B, C, H, W), vis.ids, vis.cu_seqlens, p, torch.randn(B, C, H, W), torch.rand(B),
            torch.rand(B))
    torch.library.opcheck(torch.ops.maskdm.gather_patches_kernel.default, args,
                          test_utils=("test_schema", "test_faketensor"))


BAD = [
    (lambda x, v: mk.gather_patches(x[0], v, 2), "images"),
    (lambda x, v: mk.gather_patches(x.int(), v, 2), "images"),
    (lambda x, v: mk.gather_patches(x, v, 3), "patch_size"),
    (lambda x, v: mk.gather_patches(x, v, 0), "patch_size"),
    (lambda x, v: mk.gather_patches(x, v, 4), "vis.num_patches"),
    (lambda x, v: mk.gather_patches(x[:2], v, 2), "vis.cu_seqlens"),
    (lambda x, v: mk.gather_patches(x, v.ids, 2), "vis"),
    (lambda x, v: mk.gather_patches(x, v.to("meta"), 2), "vis"),
    (lambda x, v: mk.gather_patches(x, v, 2, noise=x[:, :1]), "noise"),
    (lambda x, v: mk.gather_patches(x, v, 2, noise=x, noise_scale=torch.ones(2)), "noise_scale"),
    (lambda x, v: mk.gather_patches(x, v, 2, signal_scale=torch.ones(3, 1)), "signal_scale"),
    (lambda x, v: mk.gather_patches(x, v, 2, noise_scale=torch.ones(3)), "noise_scale"),
    (lambda x, v: mk.gather_patches(x[:, :0], v, 2), "images"),
]


@pytest.mark.parametrize("call,arg", BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD)])
def test_gather_bad_inputs_name_the_argument(call, arg):
    x = torch.randn(3, 3, 8, 8)
    vis = make_visible("uniform", 3, 16, "cpu")
    with pytest.raises((ValueError, TypeError)) as e:
        call(x, vis)
    assert f" {arg} " in str(e.value) or f" {arg}=" in str(e.value), str(e.value)
