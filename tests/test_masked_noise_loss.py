import pytest
import torch
import torch.nn.functional as F

import maskdm_kernels as mk
from maskdm_kernels import reference as ref

from .utils import BACKENDS, DTYPES, assert_close, make_images, make_visible, skip_unless_available

CASES = [(3, 4, 16, 24, "uniform"), (1, 2, 6, 10, "varlen"), (3, 1, 5, 7, "varlen"), (3, 8, 16, 8, "full"),
         (1, 4, 8, 12, "one")]
# The reference reads the same (rounded) inputs in float64: the loss differs by fp32 accumulation only, the
# gradient also by its rounding to the output dtype: two half-ulps, 2^-9 ~ 2e-3 in fp16 and 2^-7 ~ 8e-3 in bf16.
LOSS_TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-6, 1e-4), torch.bfloat16: (1e-6, 1e-4)}
GRAD_TOL = {torch.float32: (1e-7, 1e-5), torch.float16: (1e-6, 2e-3), torch.bfloat16: (1e-6, 8e-3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "C{}p{}_{}x{}_{}".format(*c))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("device,name", BACKENDS)
def test_loss_and_grad_match_reference(device, name, fmt, weighted, case, dtype):
    skip_unless_available("masked_noise_loss", name, device, dtype)
    C, p, H, W, layout = case
    B = 5
    vis = make_visible(layout, B, (H // p) * (W // p), device)
    noise = make_images((B, C, H, W), dtype, device, fmt)
    P = p * p * C
    pred = torch.randn(vis.total, 2 * P).to(device=device, dtype=dtype)[:, ::2]  # strided pred too
    pred.requires_grad_(True)
    weight = torch.rand(B, device=device) + 0.5 if weighted else None
    with mk.backend(name):
        loss = mk.masked_noise_loss(pred, noise, vis, p, weight)
        (grad,) = torch.autograd.grad(loss * 1.7, pred)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    pd = pred.detach().double().requires_grad_()
    expected = ref.masked_noise_loss_ref(pd, noise.double(), vis.ids, vis.cu_seqlens, p,
                                         weight.double() if weighted else None)
    (egrad,) = torch.autograd.grad(expected * 1.7, pd)
    assert_close(loss, expected, *LOSS_TOL[dtype], f"{name} loss")
    assert grad.dtype == dtype
    assert_close(grad, egrad, *GRAD_TOL[dtype], f"{name} d pred")


def test_reference_equals_maskdm_style_unfused_loss():
    # The loss MaskDM computes: patchify, boolean-index the visible tokens, mse per sample, mean over the batch.
    B, C, H, W, p = 4, 3, 16, 16, 4
    mask = torch.rand(B, 16).argsort(1) < 10  # True = masked, 6 visible per sample
    vis = mk.Visible.from_mask(mask)
    noise = torch.randn(B, C, H, W, dtype=torch.float64)
    pred = torch.randn(vis.total, p * p * C, dtype=torch.float64)
    target = ref.patchify(noise, p)[~mask].view(B, -1, p * p * C)
    expected = F.mse_loss(pred.view(B, -1, p * p * C), target, reduction="none").mean(dim=(1, 2)).mean()
    got = ref.masked_noise_loss_ref(pred, noise, vis.ids, vis.cu_seqlens, p)
    assert torch.allclose(got, expected)


@pytest.mark.parametrize("device,name", BACKENDS)
def test_loss_is_deterministic(device, name):
    skip_unless_available("masked_noise_loss", name, device, torch.float32)
    vis = make_visible("varlen", 7, 64, device)
    noise = torch.randn(7, 3, 32, 32, device=device)
    pred = torch.randn(vis.total, 48, device=device, requires_grad=True)
    with mk.backend(name):
        runs = [mk.masked_noise_loss(pred, noise, vis, 4) for _ in range(2)]
        grads = [torch.autograd.grad(r, pred)[0] for r in runs]
    assert torch.equal(runs[0], runs[1]) and torch.equal(grads[0], grads[1])


def test_loss_opcheck():
    vis = make_visible("varlen", 3, 16, "cpu")
    noise = torch.randn(3, 3, 8, 8)
    pred = torch.randn(vis.total, 12, requires_grad=True)
    for name in ("torch", "triton", "cpu"):
        skip_unless_available("masked_noise_loss", name, "cpu", torch.float32)
        with mk.backend(name):
            for w in (None, torch.rand(3)):
                torch.library.opcheck(torch.ops.maskdm.masked_noise_loss.default,
                                      (pred, noise, vis.ids, vis.cu_seqlens, 2, w))
            torch.library.opcheck(torch.ops.maskdm.masked_noise_loss_backward.default,
                                  (torch.tensor(1.5), pred.detach(), noise, vis.ids, vis.cu_seqlens, 2, None))


BAD = [
    (lambda pr, n, v: mk.masked_noise_loss(pr[:, :5], n, v, 2), "pred"),
    (lambda pr, n, v: mk.masked_noise_loss(pr[1:], n, v, 2), "pred"),
    (lambda pr, n, v: mk.masked_noise_loss(pr.int(), n, v, 2), "pred"),
    (lambda pr, n, v: mk.masked_noise_loss(pr, n[0], v, 2), "noise"),
    (lambda pr, n, v: mk.masked_noise_loss(pr, n, v, 3), "patch_size"),
    (lambda pr, n, v: mk.masked_noise_loss(pr, n[:2], v, 2), "vis.cu_seqlens"),
    (lambda pr, n, v: mk.masked_noise_loss(pr, n, v, 2, weight=torch.ones(2)), "weight"),
    (lambda pr, n, v: mk.masked_noise_loss(pr, n, v, 2, weight=torch.ones(3, dtype=torch.int64)), "weight"),
    (lambda pr, n, v: mk.masked_noise_loss(pr.to("meta"), n, v, 2), "pred"),
    (lambda pr, n, v: mk.masked_noise_loss(pr[:, :0], n[:, :0], v, 2), "noise"),
]


@pytest.mark.parametrize("op", ["masked_noise_loss_kernel", "masked_noise_loss_backward_kernel"])
def test_compiled_loss_rejects_zero_channels(op):
    # Called directly (no Python checks): C = 0 is a named error, not a division by zero in the launch plan.
    skip_unless_available("masked_noise_loss", "cpu", "cpu", torch.float32)
    vis = make_visible("uniform", 3, 16, "cpu")
    args = (torch.randn(vis.total, 0), torch.randn(3, 0, 8, 8), vis.ids, vis.cu_seqlens, 2, None)
    if op.endswith("backward_kernel"):
        args = (torch.tensor(1.0), *args)
    with pytest.raises(RuntimeError, match="noise must have at least one channel"):
        getattr(torch.ops.maskdm, op)(*args)


@pytest.mark.parametrize("call,arg", BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD)])
def test_loss_bad_inputs_name_the_argument(call, arg):
    vis = make_visible("uniform", 3, 16, "cpu")
    pred, noise = torch.randn(vis.total, 12), torch.randn(3, 3, 8, 8)
    with pytest.raises((ValueError, TypeError)) as e:
        call(pred, noise, vis)
    assert f" {arg} " in str(e.value) or f" {arg}=" in str(e.value), str(e.value)
