"""GaussianDiffusion: schedules, the (masked) epsilon-prediction loss, and DDPM / DDIM samplers.

The seam between diffusion and model is small: the model is called as ``model(x_t, t, y=y)`` (full images)
or ``model.forward_tokens(tokens, t, vis, y=y)`` (packed visible patches) and predicts the noise; it exposes
``patch_size`` (and ``num_classes`` / ``null_class`` for classifier-free guidance).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from maskdm_kernels import Visible, gather_patches, masked_noise_loss

from .masking import to_device

__all__ = ["DDIM_EPS", "DDIM_GRIDS", "GaussianDiffusion", "cosine_betas", "ddim_timesteps", "linear_betas"]

# DDIM timestep grids and eps handling (see ``ddim_timesteps`` and ``GaussianDiffusion.ddim_sample``).
DDIM_GRIDS = ("uniform", "reference")
DDIM_EPS = ("recompute", "model")


def linear_betas(timesteps: int) -> Tensor:
    """DDPM's linear schedule, 1e-4 to 0.02 at T=1000 (both ends scaled by 1000 / T otherwise); float64."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved-DDPM cosine schedule: ``abar(t) = cos((t/T + s) / (1 + s) * pi/2)^2``, betas clipped at
    ``max_beta``; float64."""
    def abar(u: Tensor) -> Tensor:
        return torch.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    i = torch.arange(timesteps, dtype=torch.float64)
    return (1 - abar(i + 1) / abar(i)).clamp(max=max_beta)


def ddim_timesteps(timesteps: int, steps: int, grid: str = "uniform") -> list[int]:
    """The DDIM grid, descending: the model is called at these timesteps, then ``x0`` is returned.

    - ``"uniform"`` (our default): ``round(linspace(0, T-1, steps))``, deduplicated; it ends at ``t = 0``, so the
      last model call sees the least noisy input.
    - ``"reference"`` (MaskDM / denoising-diffusion-pytorch): ``linspace(-1, T-1, steps + 1)`` in float32,
      truncated to ints, reversed, without the final ``-1``: ``{999, 995, ..., 3}`` for T=1000, 250 steps.
    """
    if not isinstance(steps, int) or not 1 <= steps <= timesteps:
        raise ValueError(f"ddim_timesteps: steps must be an int in [1, {timesteps}], got {steps!r}")
    if grid == "uniform":
        ts = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
        return sorted(set(ts), reverse=True)
    if grid == "reference":  # float32 then truncation toward zero, exactly as the reference computes it
        ts = torch.linspace(-1, timesteps - 1, steps + 1).int().tolist()
        return [t for t in reversed(ts) if t >= 0]
    raise ValueError(f"ddim_timesteps: grid must be one of {', '.join(DDIM_GRIDS)}, got {grid!r}")


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with epsilon prediction.

    Args:
        schedule: ``"cosine"`` (s=0.008, betas clipped at 0.999) or ``"linear"`` (1e-4 to 0.02).
        timesteps: T (1000 in the paper).
        loss_weighting: ``"none"`` or ``"min_snr"`` (per-sample weight ``min(SNR_t, gamma) / SNR_t``, the
            min-SNR-gamma weighting for epsilon prediction).
        min_snr_gamma: gamma of ``"min_snr"``.

    Schedule tensors are float64 on the CPU (``betas``, ``alphas_cumprod``, ...); per-step values are
    indexed on the timesteps' device and returned as float32.
    """

    def __init__(self, schedule: str = "cosine", timesteps: int = 1000, loss_weighting: str = "none",
                 min_snr_gamma: float = 5.0):
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"GaussianDiffusion: schedule must be 'cosine' or 'linear', got {schedule!r}")
        if not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"GaussianDiffusion: timesteps must be a positive int, got {timesteps!r}")
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"GaussianDiffusion: loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        self.schedule = schedule
        self.num_timesteps = timesteps
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)

        betas = cosine_betas(timesteps) if schedule == "cosine" else linear_betas(timesteps)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self._cache: dict[tuple[str, torch.device], Tensor] = {}

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(schedule={self.schedule!r}, timesteps={self.num_timesteps}, "
                f"loss_weighting={self.loss_weighting!r})")

    # --------------------------------------------------------------------------------------------- helpers
    def _at(self, name: str, t: Tensor) -> Tensor:
        """float32 ``(B,)``: schedule array ``name`` at timesteps ``t`` (on t's device)."""
        key = (name, t.device)
        arr = self._cache.get(key)
        if arr is None:
            arr = getattr(self, name).to(device=t.device, dtype=torch.float32)
            self._cache[key] = arr
        return arr[t.long()]

    def loss_weight(self, t: Tensor) -> Tensor | None:
        """Per-sample weights ``(B,)`` of the configured weighting at timesteps ``t`` (None for ``"none"``)."""
        if self.loss_weighting == "none":
            return None
        snr = self._at("snr", t)
        return snr.clamp(max=self.min_snr_gamma) / snr

    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """int64 ``(B,)`` uniform in ``{0, ..., T-1}``."""
        return _randint(self.num_timesteps, (batch_size,), device, generator)

    # ------------------------------------------------------------------------------------------- forward q
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise`` for images ``(B, C, H, W)``."""
        if noise is None:
            noise = _randn(x0.shape, x0.device, generator, x0.dtype)
        a = self._at("sqrt_alphas_cumprod", t).view(-1, *([1] * (x0.dim() - 1)))
        s = self._at("sqrt_one_minus_alphas_cumprod", t).view(-1, *([1] * (x0.dim() - 1)))
        return (a * x0 + s * noise).to(x0.dtype)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        a = self._at("sqrt_alphas_cumprod", t).view(-1, 1, 1, 1)
        s = self._at("sqrt_one_minus_alphas_cumprod", t).view(-1, 1, 1, 1)
        return (x_t - s * eps) / a

    # ------------------------------------------------------------------------------------------------ loss
    def loss(self, model, x0: Tensor, vis: Visible | None = None, t: Tensor | None = None,
             noise: Tensor | None = None, weight: Tensor | None = None, *, y: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """The denoising loss: mean over samples of ``w_b *`` mean over b's (visible) elements of
        ``(eps_pred - eps)^2``.

        Args:
            model: a ``MaskedViT`` (anything with ``forward_tokens``, ``patch_size`` and ``__call__``).
            x0: clean images ``(B, C, H, W)`` in [-1, 1].
            vis: kept patches. Given: masked denoising score matching on the visible patches only, through
                ``gather_patches`` (noising fused into the gather) -> ``model.forward_tokens`` ->
                ``masked_noise_loss``; no full noisy image is built. ``None``: the plain DDPM loss.
            t: int64 ``(B,)`` timesteps (default: uniform).
            noise: ``(B, C, H, W)`` (default: standard normal).
            weight: optional ``(B,)`` per-sample weights, multiplied with the configured weighting.
            y: class labels for a class-conditional model.
            generator: for the default ``t`` and ``noise``.
        Returns:
            0-dim float32 loss.
        """
        B = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(B, x0.device, generator)
        if noise is None:
            noise = _randn(x0.shape, x0.device, generator, x0.dtype)
        w = self.loss_weight(t)
        if weight is not None:
            weight = weight.to(device=x0.device, dtype=torch.float32)
            w = weight if w is None else w * weight
        kwargs = {} if y is None else {"y": y}
        if vis is not None:
            a = self._at("sqrt_alphas_cumprod", t)
            s = self._at("sqrt_one_minus_alphas_cumprod", t)
            tokens = gather_patches(x0, vis, model.patch_size, noise=noise, signal_scale=a, noise_scale=s)
            pred = model.forward_tokens(tokens, t, vis, **kwargs)  # (T, p*p*C)
            return masked_noise_loss(pred, noise, vis, model.patch_size, weight=w)
        pred = model(self.q_sample(x0, t, noise), t, **kwargs)
        per_sample = (pred.float() - noise.float()).square().flatten(1).mean(1)  # (B,)
        if w is not None:
            per_sample = per_sample * w
        return per_sample.mean()

    # ---------------------------------------------------------------------------------------------- sample
    def _eps(self, model, x: Tensor, t: Tensor, y: Tensor | None, guidance_scale: float) -> Tensor:
        """Model noise prediction, with classifier-free guidance ``eps_u + s * (eps_c - eps_u)`` when asked."""
        if y is None or guidance_scale == 1.0:
            return model(x, t, **({} if y is None else {"y": y})).float()
        null = torch.full_like(y, model.null_class)
        eps = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null])).float()
        cond, uncond = eps.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _setup(self, model, shape, device, y, guidance_scale, noise, generator):
        if device is None:
            device = next(model.parameters()).device
        device = torch.device(device)
        if y is not None:
            if getattr(model, "num_classes", 0) <= 0:
                raise ValueError("GaussianDiffusion: y was given but the model is not class-conditional")
            y = torch.as_tensor(y, device=device).long()
        elif guidance_scale != 1.0:
            raise ValueError("GaussianDiffusion: guidance_scale != 1 needs class labels y")
        x = noise.to(device=device, dtype=torch.float32) if noise is not None else _randn(
            shape, device, generator, torch.float32)
        return device, y, x

    @torch.no_grad()
    def ddpm_sample(self, model, shape, *, y: Tensor | None = None, guidance_scale: float = 1.0,
                    clip_denoised: bool = True, noise: Tensor | None = None, device=None,
                    generator: torch.Generator | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Tensor:
        """Ancestral DDPM sampling over all T steps.

        ``x_{t-1} = coef1_t * x0_hat + coef2_t * x_t + sqrt(beta_tilde_t) * z`` (no noise at t = 0), with
        ``x0_hat`` from the predicted noise, clipped to [-1, 1] when ``clip_denoised``.

        Args:
            model: the denoiser (called as ``model(x, t)``; put it in eval mode).
            shape: ``(B, C, H, W)``.
            y, guidance_scale: class labels and classifier-free guidance scale (1.0: no guidance).
            noise: optional starting ``x_T``.
            device: default the model's.
            generator: a ``torch.Generator`` for every draw (on its own device; moved to ``device``).
            progress: called as ``progress(step, total)`` after each step (step counts from 1).
        Returns:
            float32 ``(B, C, H, W)`` samples (in [-1, 1] up to the last step's tiny noise-free residue).
        """
        device, y, x = self._setup(model, shape, device, y, guidance_scale, noise, generator)
        T = self.num_timesteps
        for i, step in enumerate(reversed(range(T))):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            eps = self._eps(model, x, t, y, guidance_scale)
            x0 = self.predict_x0(x, t, eps)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            mean = self._at("posterior_mean_coef1", t).view(-1, 1, 1, 1) * x0 + \
                self._at("posterior_mean_coef2", t).view(-1, 1, 1, 1) * x
            if step > 0:
                std = self._at("posterior_variance", t).sqrt().view(-1, 1, 1, 1)
                x = mean + std * _randn(x.shape, device, generator, x.dtype)
            else:
                x = mean
            if progress is not None:
                progress(i + 1, T)
        return x

    @torch.no_grad()
    def ddim_sample(self, model, shape, *, steps: int = 50, eta: float = 0.0, y: Tensor | None = None,
                    guidance_scale: float = 1.0, clip_denoised: bool = True, noise: Tensor | None = None,
                    device=None, generator: torch.Generator | None = None,
                    progress: Callable[[int, int], None] | None = None, grid: str = "uniform",
                    eps_mode: str = "recompute") -> Tensor:
        """DDIM sampling on the ``steps`` timesteps of ``ddim_timesteps(T, steps, grid)``.

        ``eta=0`` is deterministic given the starting noise; ``eta=1`` adds DDPM-sized noise (the paper
        samples with eta=1.0 and 250 steps). ``x0_hat`` is clipped to [-1, 1] when ``clip_denoised``; then
        ``eps_mode="recompute"`` (default, as guided-diffusion) recomputes the noise estimate from the clipped
        ``x0_hat`` so that the update stays on the line through ``x_t`` and the clipped ``x0_hat``, while
        ``"model"`` keeps the model's own eps (the MaskDM reference). After the last grid step ``x0_hat`` is
        returned. Other arguments as in ``ddpm_sample``.
        """
        if eta < 0:
            raise ValueError(f"ddim_sample: eta must be >= 0, got {eta}")
        if eps_mode not in DDIM_EPS:
            raise ValueError(f"ddim_sample: eps_mode must be one of {', '.join(DDIM_EPS)}, got {eps_mode!r}")
        ts = ddim_timesteps(self.num_timesteps, steps, grid)
        device, y, x = self._setup(model, shape, device, y, guidance_scale, noise, generator)
        abar = self.alphas_cumprod
        for i, step in enumerate(ts):
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            a_t = float(abar[step])
            a_prev = float(abar[prev]) if prev >= 0 else 1.0
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            eps = self._eps(model, x, t, y, guidance_scale)
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
                if eps_mode == "recompute":
                    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * _randn(x.shape, device, generator, x.dtype)
            if progress is not None:
                progress(i + 1, len(ts))
        return x


def _randn(shape, device, generator, dtype) -> Tensor:
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return to_device(torch.randn(shape, generator=generator, device=generator.device, dtype=dtype), device)


def _randint(high: int, shape, device, generator) -> Tensor:
    if generator is None:
        return torch.randint(0, high, shape, device=device)
    return to_device(torch.randint(0, high, shape, generator=generator, device=generator.device), device)
