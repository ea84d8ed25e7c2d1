"""masked_noise_loss forward + backward vs the MaskDM chain (patchify the noise, boolean-index, mse, means).

Minimal bytes: pred and the visible noise read once, the gradient written once."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import maskdm_kernels as mk

from .common import DEVICE, PATCH_DTYPE, PATCH_SHAPE, backend_providers, block_mask, record, timed, visible_from_mask

RATIOS = [0.5, 0.9]


def _inputs(ratio):
    B, C, S, p = (PATCH_SHAPE[k] for k in ("batch", "channels", "size", "patch"))
    noise = torch.randn(B, C, S, S, device=DEVICE, dtype=PATCH_DTYPE)
    mask = block_mask(B, S // p, ratio)
    vis = visible_from_mask(mask)
    pred = torch.randn(vis.total, p * p * C, device=DEVICE, dtype=PATCH_DTYPE, requires_grad=True)
    return pred, noise, mask, vis, p


def maskdm_loss(pred, noise, mask, p):
    B = noise.shape[0]
    target = rearrange(noise, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)[~mask]
    per_elem = F.mse_loss(pred.float(), target.float(), reduction="none").view(B, -1, pred.shape[1])
    return per_elem.mean(dim=(1, 2)).mean()


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("provider", backend_providers("masked_noise_loss", PATCH_DTYPE) + ["maskdm_chain"])
def test_loss_forward_backward(benchmark, provider, ratio):
    pred, noise, mask, vis, p = _inputs(ratio)
    benchmark.group = f"masked_noise_loss fwd+bwd {tuple(noise.shape)} p={p} mask={ratio}"

    def step():
        if provider == "maskdm_chain":
            loss = maskdm_loss(pred, noise, mask, p)
        else:
            with mk.backend(provider):
                loss = mk.masked_noise_loss(pred, noise, vis, p)
        (g,) = torch.autograd.grad(loss, pred)
        return loss, g

    fn = timed(step)
    loss, _ = fn()
    torch.testing.assert_close(loss, maskdm_loss(pred, noise, mask, p).detach(), rtol=1e-4, atol=1e-6)
    benchmark(fn)
    es = torch.finfo(pred.dtype).bits // 8
    record(benchmark, fn, graph=provider != "maskdm_chain", bytes_moved=3 * pred.numel() * es,
           visible_tokens=vis.total)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("provider", ["auto", "maskdm_chain"])
def test_gather_noise_plus_loss(benchmark, provider, ratio):
    """The masked-training data path around the model: noised visible tokens in, loss and d pred out.

    ``auto`` is the default path a user gets; the model is stood in for by a copy of the tokens."""
    from .test_bench_gather_patches import maskdm_chain

    _, noise, mask, vis, p = _inputs(ratio)
    B = noise.shape[0]
    x = torch.randn_like(noise)
    abar = torch.rand(B, device=noise.device)
    ss, ns = abar.sqrt(), (1 - abar).sqrt()
    benchmark.group = f"gather+noise, loss fwd+bwd {tuple(noise.shape)} p={p} mask={ratio}"

    def step():
        if provider == "maskdm_chain":
            pred = maskdm_chain(x, noise, ss, ns, mask, p).requires_grad_(True)
            loss = maskdm_loss(pred, noise, mask, p)
        else:
            pred = mk.gather_patches(x, vis, p, noise=noise, signal_scale=ss, noise_scale=ns).requires_grad_(True)
            loss = mk.masked_noise_loss(pred, noise, vis, p)
        return torch.autograd.grad(loss, pred)[0]

    fn = timed(step)
    fn()
    benchmark(fn)
    es = torch.finfo(noise.dtype).bits // 8
    # gather: read x and noise, write tokens; loss: read pred and noise, write grad (visible elements only).
    record(benchmark, fn, graph=provider != "maskdm_chain", bytes_moved=6 * vis.total * p * p * noise.shape[1] * es,
           visible_tokens=vis.total)
