"""Static-capacity varlen layout: padding a varlen batch to fixed shapes keeps the loss and every gradient."""

from __future__ import annotations

import pytest
import torch

from maskdm import GaussianDiffusion, masking
from maskdm.model import MaskedViT
from tests.utils import assert_close


def small() -> MaskedViT:
    return MaskedViT(img_size=16, patch_size=2, in_chans=3, embed_dim=32, depth=3, num_heads=2).train()


def loss_and_grads(model, diffusion, x0, vis, t, noise, weight=None):
    model.zero_grad(set_to_none=True)
    loss = diffusion.loss(model, x0, vis, t=t, noise=noise, weight=weight)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
@pytest.mark.parametrize("kind,ratio,block", [("block", (0.5, 0.95), 2), ("random", (0.2, 0.9), 1)])
def test_padded_layout_gives_the_exact_loss_and_gradients(kind, ratio, block, weighting):
    torch.manual_seed(0)
    model, diffusion = small(), GaussianDiffusion(timesteps=100, loss_weighting=weighting)
    B, grid = 6, 8
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(B, 3, 16, 16, generator=g) * 2 - 1, torch.randn(B, 3, 16, 16, generator=g)
    t = torch.randint(0, 100, (B,), generator=g)
    cap = masking.static_capacity(B, grid, ratio, block_size=block)
    for _ in range(2):  # two draws: different T, same padded shapes
        vis = (masking.block_patches(B, grid, ratio, block_size=block, generator=g) if kind == "block"
               else masking.random_patches(B, grid, ratio, generator=g))
        assert not vis.uniform and vis.total < cap.tokens
        loss_e, grads_e = loss_and_grads(model, diffusion, x0, vis, t, noise)
        x0p, tp, noisep, visp, w = masking.pad_batch(x0, t, noise, vis, cap)
        assert visp.total == cap.tokens and visp.batch_size == B + cap.fillers and x0p.shape[0] == B + cap.fillers
        loss_p, grads_p = loss_and_grads(model, diffusion, x0p, visp, tp, noisep, weight=w)
        # fp32: the padded loss is a sum over B + F samples scaled by (B + F) / B (a few roundings), and the
        # filler sequences add exact zeros to every gradient sum: agreement to float32 rounding.
        assert_close(loss_p, loss_e, 1e-6, 1e-5, "loss")
        for n, ge in grads_e.items():
            assert_close(grads_p[n], ge, 1e-6 * ge.abs().max().item() + 1e-9, 1e-4, n)


def test_filler_tokens_do_not_reach_real_outputs():
    """The model's outputs on real tokens are unchanged by fillers (attention stays within each sequence)."""
    torch.manual_seed(0)
    model = small().eval()
    B = 4
    vis = masking.block_patches(B, 8, (0.5, 0.9), block_size=2, generator=torch.Generator().manual_seed(2))
    cap = masking.static_capacity(B, 8, (0.5, 0.9), block_size=2)
    x = torch.randn(B, 3, 16, 16)
    t = torch.randint(0, 1000, (B,))
    xp, tp, _, visp, _ = masking.pad_batch(x, t, x, vis, cap)
    with torch.no_grad():
        exact = model(x, t, vis)
        padded = model(xp, tp, visp)
    assert padded.shape == (cap.tokens, 12)
    assert_close(padded[:vis.total], exact, 1e-5, 1e-4, "real tokens")
    assert torch.isfinite(padded).all()


def test_train_step_on_a_slack_capacity_follows_the_exact_step():
    """TrainStep pads each varlen batch to its capacity, and a draw over a slack capacity to the guaranteed one:
    losses and weights of the exact-layout step over several steps (eager fp32: rounding only)."""
    from maskdm.ema import EMA
    from maskdm.step import Denoiser, TrainStep

    cap = masking.static_capacity(6, 8, (0.25, 0.9), block_size=2, slack=0.0)  # about half the draws exceed it

    def run(capacity):
        torch.manual_seed(0)
        model = small()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = TrainStep(model, Denoiser(model), GaussianDiffusion(timesteps=100), opt, EMA(model), 1.0, False,
                         capacity=capacity)
        g = torch.Generator().manual_seed(1)  # a seed whose 6 draws fall on both sides of the capacity
        losses, over = [], 0
        for _ in range(6):
            x0, noise = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1, torch.randn(6, 3, 16, 16, generator=g)
            t = torch.randint(0, 100, (6,), generator=g)
            vis = masking.block_patches(6, 8, (0.25, 0.9), block_size=2, generator=g)
            over += not cap.fits(vis)
            losses.append(step(x0, t, noise, vis, 1e-3, 0.9).loss)
        return torch.stack(losses), list(model.parameters()), over

    le, pe, _ = run(None)
    lc, pc, over = run(cap)
    assert 0 < over < 6  # both capacities were used
    assert_close(lc, le, 1e-6, 1e-5, "losses")
    for a, b in zip(pc, pe):
        assert_close(a.detach(), b.detach(), 1e-6, 1e-4, "weights")
