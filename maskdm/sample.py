"""Sampling: rebuild a model from a checkpoint, draw images with DDIM or DDPM, save grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import find_checkpoint, load_config_dict, load_into, load_weights
from .config import Config, config_from_dict
from .diffusion import GaussianDiffusion
from .model import MaskedViT, create_model

__all__ = ["build_model", "generate", "load_for_sampling", "make_diffusion", "save_grid", "to_uint8"]


def build_model(cfg: Config, in_chans: int) -> MaskedViT:
    """The config's model (preset + overrides) for ``data.image_size`` and ``in_chans`` channels."""
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                                       "mlp_time_embed")
                 if getattr(m, k) is not None}
    return create_model(m.name, img_size=cfg.data.image_size, in_chans=in_chans, **overrides)


def data_channels(cfg: Config) -> int:
    return 1 if cfg.data.dataset == "fashion_mnist" else (cfg.data.channels or 3)


def load_for_sampling(ckpt: str | Path, which: str = "ema",
                      device="cpu") -> tuple[MaskedViT, GaussianDiffusion, Config]:
    """(model in eval mode on ``device``, its diffusion, its config) from a checkpoint or run folder. The model's
    forward is compiled as the run's ``train.compile`` says for ``device`` (``auto``: on CUDA, not on CPU)."""
    from .step import compile_forward, resolve_compile

    path = find_checkpoint(ckpt)
    cfg = config_from_dict(load_config_dict(path))
    model = build_model(cfg, data_channels(cfg))
    load_into(model, load_weights(path, which), path)  # a mismatch is one line naming the checkpoint
    model.to(device).eval()
    return compile_forward(model, resolve_compile(cfg.train.compile, device)), make_diffusion(cfg), cfg


def make_diffusion(cfg: Config) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion(d.schedule, d.timesteps, loss_weighting=d.loss_weighting, min_snr_gamma=d.min_snr_gamma)


@torch.no_grad()
def generate(model: MaskedViT, diffusion: GaussianDiffusion, num: int, *, sampler: str = "ddim", steps: int = 50,
             eta: float = 0.0, batch_size: int = 256, seed: int = 0, first_batch: int = 0, device=None,
             autocast: bool = False, progress=None, grid: str = "uniform", eps_mode: str = "recompute") -> Tensor:
    """``num`` samples, float32 ``(num, C, H, W)`` in [-1, 1] on the CPU. Batch ``i`` (counting from
    ``first_batch``) draws from a generator seeded ``(seed, i)``, so the images depend only on the seed and
    the batch size, not on how the batches are spread over processes.
    ``autocast``: bf16 autocast (False: fp32, as the reference samples). ``grid`` / ``eps_mode``: the DDIM
    timestep grid and eps handling (``GaussianDiffusion.ddim_sample``).
    ``progress(n)`` is called with the number of finished denoising steps x images."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num (images to generate) must be an integer >= 1, got {num!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    shape = (model.in_chans, *model.img_size)
    out = []
    try:
        for i, start in enumerate(range(0, num, batch_size), start=first_batch):
            b = min(batch_size, num - start)
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
            cb = (lambda k, total, b=b: progress(b)) if progress is not None else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if sampler == "ddim":
                    x = diffusion.ddim_sample(model, (b, *shape), steps=steps, eta=eta, generator=g, device=device,
                                              progress=cb, grid=grid, eps_mode=eps_mode)
                else:
                    x = diffusion.ddpm_sample(model, (b, *shape), generator=g, device=device, progress=cb)
            out.append(x.float().clamp(-1, 1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 (what a saved PNG holds)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Save ``(B, C, H, W)`` images (uint8, or floats in [-1, 1]) as one PNG grid, atomically."""
    from PIL import Image

    if images.dtype != torch.uint8:
        images = to_uint8(images)
    B, C, H, W = images.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(grid[..., 0] if C == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
