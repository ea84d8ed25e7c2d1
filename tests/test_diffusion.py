"""GaussianDiffusion: schedules against closed forms, q_sample statistics, losses, samplers, guidance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import maskdm_kernels as mk
from maskdm import GaussianDiffusion, MaskedViT, masking
from maskdm_kernels.reference import patchify

from .utils import assert_close


def small(num_classes: int = 0) -> MaskedViT:
    return MaskedViT(16, 2, in_chans=3, embed_dim=32, depth=3, num_heads=2, num_classes=num_classes).eval()


class GaussianOracle(nn.Module):
    """The exact noise predictor for data x0 ~ N(mu, sigma^2) per pixel: E[eps | x_t]."""

    def __init__(self, diffusion: GaussianDiffusion, mu: float, sigma: float):
        super().__init__()
        self.abar = diffusion.alphas_cumprod.float()
        self.mu, self.var = mu, sigma ** 2
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.var + 1 - a)


# ---------------------------------------------------------------------------------------------------- schedules
def test_linear_schedule_closed_form():
    d = GaussianDiffusion("linear", 1000)
    assert d.betas.dtype == torch.float64 and d.betas.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    i = 417
    assert d.betas[i].item() == pytest.approx(1e-4 + (0.02 - 1e-4) * i / 999, rel=1e-12)
    assert d.alphas_cumprod[i].item() == pytest.approx(math.prod(1 - b for b in d.betas[:i + 1].tolist()), rel=1e-10)


def test_cosine_schedule_closed_form():
    d = GaussianDiffusion("cosine", 1000)
    f = [math.cos((i / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(1001)]
    for i in (0, 1, 250, 500, 900, 998):
        assert d.alphas_cumprod[i].item() == pytest.approx(f[i + 1] / f[0], rel=1e-9)  # unclipped region
    assert d.betas.max().item() == pytest.approx(0.999)  # clipped at the end
    assert d.betas[-1].item() == pytest.approx(0.999)


def test_posterior_and_snr():
    d = GaussianDiffusion("linear", 1000)
    i = 300
    ab, ab_prev, beta = d.alphas_cumprod[i], d.alphas_cumprod[i - 1], d.betas[i]
    assert d.posterior_variance[i].item() == pytest.approx((beta * (1 - ab_prev) / (1 - ab)).item())
    assert d.snr[i].item() == pytest.approx((ab / (1 - ab)).item())
    assert d.alphas_cumprod_prev[0].item() == 1.0


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion("sigmoid")
    with pytest.raises(ValueError, match="loss_weighting"):
        GaussianDiffusion(loss_weighting="p2")


# ---------------------------------------------------------------------------------------------------- q_sample
def test_q_sample_statistics():
    d = GaussianDiffusion("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4, 1, 64, 64), 0.7)
    t = torch.tensor([0, 200, 600, 950])
    xt = d.q_sample(x0, t, generator=g)
    for b in range(4):
        ab = d.alphas_cumprod[t[b]].item()
        assert xt[b].mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.03)
        assert xt[b].std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.05, abs=1e-3)
    noise = torch.randn_like(x0)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)  # float64: 1 - abar in float32 would lose digits near t = 0
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    assert_close(d.q_sample(x0, t, noise), expected, 1e-6, 1e-6, "q_sample")


# -------------------------------------------------------------------------------------------------------- loss
def _manual_masked_loss(d, model, x0, vis, t, noise, w=None):
    xt = d.q_sample(x0, t, noise)
    bidx = vis.sample_index()
    tokens = patchify(xt, 2)[bidx, vis.ids.long()]
    target = patchify(noise, 2)[bidx, vis.ids.long()]
    pred = model.forward_tokens(tokens, t, vis)
    err = (pred - target).square().sum(1)
    per_sample = torch.zeros(vis.batch_size).index_add(0, bidx, err) / (vis.lengths * target.shape[1])
    return (per_sample * (1 if w is None else w)).mean()


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_masked_loss_matches_manual(weighting):
    d = GaussianDiffusion("cosine", loss_weighting=weighting)
    model = small()
    x0, noise = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 10, 400, 999])
    vis = masking.random_patches(4, 8, (0.2, 0.9), generator=torch.Generator().manual_seed(0))
    w = None
    if weighting == "min_snr":
        snr = d.snr[t].float()
        w = snr.clamp(max=5.0) / snr
        assert_close(d.loss_weight(t), w, 1e-6, 1e-6, "min-SNR weights")
    expected = _manual_masked_loss(d, model, x0, vis, t, noise, w)
    assert_close(d.loss(model, x0, vis, t=t, noise=noise), expected, 1e-5, 1e-5, "masked loss")
    extra = torch.tensor([1.0, 2.0, 0.5, 0.0])
    assert_close(d.loss(model, x0, vis, t=t, noise=noise, weight=extra),
                 _manual_masked_loss(d, model, x0, vis, t, noise, extra * (1 if w is None else w)),
                 1e-5, 1e-5, "masked loss with weights")


def test_full_loss_is_ddpm_and_equals_all_visible_masked_loss():
    d = GaussianDiffusion("linear")
    model = small()
    x0, noise = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    t = torch.tensor([5, 50, 500])
    full = d.loss(model, x0, t=t, noise=noise)
    expected = nn.functional.mse_loss(model(d.q_sample(x0, t, noise), t), noise)
    assert_close(full, expected, 1e-6, 1e-6, "DDPM loss")
    assert_close(d.loss(model, x0, mk.Visible.full(3, 64), t=t, noise=noise), full, 1e-5, 1e-5, "all visible")


def test_loss_draws_t_and_noise_from_generator():
    d = GaussianDiffusion()
    model = small()
    x0 = torch.randn(2, 3, 16, 16)
    vis = masking.block_patches(2, 8, 0.5, block_size=2)
    a = d.loss(model, x0, vis, generator=torch.Generator().manual_seed(3))
    b = d.loss(model, x0, vis, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- samplers
def test_ddim_eta0_is_deterministic_and_samplers_shaped():
    d = GaussianDiffusion("cosine", timesteps=20)
    model = small()
    noise = torch.randn(2, 3, 16, 16)
    a = d.ddim_sample(model, (2, 3, 16, 16), steps=5, eta=0.0, noise=noise, generator=torch.Generator().manual_seed(0))
    b = d.ddim_sample(model, (2, 3, 16, 16), steps=5, eta=0.0, noise=noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert a.abs().max() <= 1.0  # the last step returns the clipped x0
    c = d.ddim_sample(model, (2, 3, 16, 16), steps=5, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(0))
    e = d.ddim_sample(model, (2, 3, 16, 16), steps=5, eta=1.0, noise=noise, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(c, e)
    calls = []
    s = d.ddpm_sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0),
                      progress=lambda i, n: calls.append((i, n)))
    assert s.shape == (2, 3, 16, 16) and torch.isfinite(s).all()
    assert calls == [(i, 20) for i in range(1, 21)]
    again = d.ddpm_sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, again)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0", "ddim_eta1"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_recover_a_gaussian_data_distribution(sampler, schedule):
    """With the exact noise predictor for N(mu, sigma^2) data, samples must have that mean and std
    (a broken ancestral sampler, as in the paper's code, does not)."""
    d = GaussianDiffusion(schedule, 1000)
    mu, sigma = 0.3, 0.5
    oracle = GaussianOracle(d, mu, sigma)
    shape = (1024, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    if sampler == "ddpm":
        x = d.ddpm_sample(oracle, shape, clip_denoised=False, generator=g)
    else:
        x = d.ddim_sample(oracle, shape, steps=1000, eta=0.0 if sampler == "ddim_eta0" else 1.0,
                          clip_denoised=False, generator=g)
    # NOTE: fewer DDIM steps bias the std low (discretisation: 0.484 at 100 steps, 0.494 at 250, eta=1, cosine)
    assert x.mean().item() == pytest.approx(mu, abs=0.015)
    assert x.std().item() == pytest.approx(sigma, rel=0.025)


def test_ddim_with_eta1_on_every_step_is_the_ddpm_sampler():
    d = GaussianDiffusion("linear", timesteps=20)
    model = small()
    shape = (2, 3, 16, 16)
    a = d.ddpm_sample(model, shape, generator=torch.Generator().manual_seed(5))
    b = d.ddim_sample(model, shape, steps=20, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert_close(b, a, 1e-4, 1e-4, "DDIM(eta=1, every step) vs ancestral DDPM")


def test_ddim_grids():
    from maskdm.diffusion import ddim_timesteps

    ref = ddim_timesteps(1000, 250, "reference")
    assert ref[:3] == [999, 995, 991] and ref[-1] == 3 and len(ref) == 250  # {999, 995, ..., 3}, then x0
    assert ref == list(range(999, 2, -4))
    uni = ddim_timesteps(1000, 250, "uniform")
    assert uni[0] == 999 and uni[-1] == 0 and len(uni) == 250 and uni[1] == 995  # round(linspace(0, 999, 250))
    assert ddim_timesteps(1000, 1000, "reference") == list(range(999, -1, -1))
    assert ddim_timesteps(1000, 1, "reference") == [999]
    # steps that do not divide T: float32 linspace then truncation, as the reference computes it
    want = [t for t in reversed(torch.linspace(-1, 999, 8).int().tolist()) if t >= 0]
    assert ddim_timesteps(1000, 7, "reference") == want
    with pytest.raises(ValueError, match="grid"):
        ddim_timesteps(1000, 10, "quadratic")
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0, "uniform")


class AffineEps(nn.Module):
    """Predicts eps = a * x_t + b: x0_hat leaves [-1, 1] in part of the pixels and is clipped there."""

    def __init__(self, a: float = 0.8, b: float = -0.5):
        super().__init__()
        self.a, self.b = a, b
        self.dummy = nn.Parameter(torch.zeros(()))
        self.ts = []

    def forward(self, x, t):
        self.ts.append(int(t[0]))
        return self.a * x + self.b


@pytest.mark.parametrize("eps_mode", ["recompute", "model"])
@pytest.mark.parametrize("grid", ["uniform", "reference"])
def test_ddim_eps_modes_against_manual_steps(eps_mode, grid):
    """Two deterministic (eta=0) DDIM steps written out in float64: the model's eps is kept after clipping
    ("model", the reference) or recomputed from the clipped x0 ("recompute")."""
    d = GaussianDiffusion("cosine", timesteps=10)
    model = AffineEps()
    x = torch.linspace(-2, 2, 16).view(1, 1, 4, 4)
    out = d.ddim_sample(model, (1, 1, 4, 4), steps=2, eta=0.0, noise=x, grid=grid, eps_mode=eps_mode)
    ts = [9, 0] if grid == "uniform" else [9, 4]
    assert model.ts == ts
    xs = x.double()
    abar = d.alphas_cumprod
    for i, t in enumerate(ts):
        a = abar[t].item()
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = 0.8 * xs - 0.5
        x0 = ((xs - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        if eps_mode == "recompute":
            eps = (xs - math.sqrt(a) * x0) / math.sqrt(1 - a)
        xs = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    # float32 sampler vs float64 replay: a few ulps of values of size ~2
    assert_close(out, xs.float(), 1e-5, 1e-5, f"ddim {grid} {eps_mode}")
    other = d.ddim_sample(AffineEps(), (1, 1, 4, 4), steps=2, eta=0.0, noise=x, grid=grid,
                          eps_mode="model" if eps_mode == "recompute" else "recompute")
    assert torch.equal(out, out.clamp(-1, 1)) and (out.abs() < 1).any()  # the clipped x0, partly inside
    assert (out - other).abs().max() > 0.01  # the two modes differ once x0 is clipped
    with pytest.raises(ValueError, match="eps_mode"):
        d.ddim_sample(model, (1, 1, 4, 4), steps=2, eps_mode="clip")


def test_classifier_free_guidance_combines_branches():
    class Stub(nn.Module):
        num_classes, null_class = 3, 3

        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))
            self.seen = []

        def forward(self, x, t, y=None):
            self.seen.append(y.clone())
            return torch.zeros_like(x) + (y != 3).float().view(-1, 1, 1, 1)  # cond: 1, uncond: 0

    d = GaussianDiffusion(timesteps=10)
    stub = Stub()
    x, t, y = torch.randn(2, 1, 2, 2), torch.tensor([5, 5]), torch.tensor([0, 2])
    eps = d._eps(stub, x, t, y, guidance_scale=4.0)
    assert torch.equal(eps, torch.full_like(x, 4.0))  # 0 + 4 * (1 - 0)
    assert stub.seen[-1].tolist() == [0, 2, 3, 3]  # one batched call: labels, then "no class"
    model = small(num_classes=3)
    out = d.ddim_sample(model, (2, 3, 16, 16), steps=3, y=torch.tensor([0, 2]), guidance_scale=2.0)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not class-conditional"):
        d.ddim_sample(small(), (1, 3, 16, 16), steps=2, y=torch.tensor([0]))
