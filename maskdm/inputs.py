"""What a training step draws, as a pure function of ``(seed, step)``, and the global RNG states a checkpoint keeps.

Every random draw of step ``s`` (timesteps, noise, flips, masks) comes from generators seeded by ``(seed, s)``
over the *global* batch, and each rank keeps its share (positions ``rank::world``), matching the batch
``DistributedSampler`` gives it: ``--resume`` replays the uninterrupted run exactly, on 1 or N processes.
"""

from __future__ import annotations

import random

import torch

from maskdm_kernels import Visible

from . import masking
from .config import StageConfig
from .distributed import Dist

__all__ = ["make_mask", "mix_seed", "restore_rng", "rng_state", "step_generator", "step_inputs"]

_MASK64 = (1 << 63) - 1


def mix_seed(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over a running hash)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK64


def step_generator(seed: int, step: int, stream: int, device) -> torch.Generator:
    """The generator of random stream ``stream`` at global step ``step``."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, step, stream))


def _rows(vis: Visible, rank: int, world: int) -> Visible:
    """Samples ``rank::world`` of a layout."""
    if world == 1:
        return vis
    B = vis.batch_size
    if vis.uniform:
        ids = vis.ids.view(B, vis.max_seqlen)[rank::world].reshape(-1).contiguous()
        b = ids.numel() // max(vis.max_seqlen, 1)
        cu = torch.arange(b + 1, device=ids.device, dtype=torch.int32) * vis.max_seqlen
        return Visible(ids, cu, vis.max_seqlen, vis.num_patches, True)
    keep = torch.zeros(B, vis.num_patches, dtype=torch.bool, device=vis.device)
    keep[vis.sample_index(), vis.ids.long()] = True
    return Visible.from_mask(~keep[rank::world])  # varlen: one host sync


def make_mask(stage: StageConfig, batch: int, grid: tuple[int, int], device, generator) -> Visible | None:
    if stage.mask == "none":
        return None
    ratio = list(stage.mask_ratio) if isinstance(stage.mask_ratio, tuple) else stage.mask_ratio
    if stage.mask == "random":
        return masking.random_patches(batch, grid, ratio, device=device, generator=generator)
    if stage.mask == "block":
        return masking.block_patches(batch, grid, ratio, block_size=stage.block_size, device=device,
                                     generator=generator)
    return masking.crop_patches(batch, grid, stage.crop_size, device=device, generator=generator)


def step_inputs(seed: int, step: int, stage: StageConfig, global_batch: int, shape: tuple, grid: tuple,
                timesteps: int, hflip: float, d: Dist):
    """(t, noise, flip, vis) of this rank at global step ``step``: drawn for the global batch, sliced."""
    dev, r, w = d.device, d.rank, d.world
    t = torch.randint(0, timesteps, (global_batch,), generator=step_generator(seed, step, 0, dev), device=dev)
    noise = torch.randn((global_batch, *shape), generator=step_generator(seed, step, 1, dev), device=dev)
    flip = None
    if hflip > 0:
        flip = torch.rand(global_batch, generator=step_generator(seed, step, 2, dev), device=dev)[r::w] < hflip
    # Varlen ratios draw their per-sample counts on the host: give them a CPU generator so they are seeded too.
    mdev = "cpu" if isinstance(stage.mask_ratio, tuple) else dev
    vis = make_mask(stage, global_batch, grid, dev, step_generator(seed, step, 3, mdev))
    vis = _rows(vis, r, w) if vis is not None else None
    return t[r::w].contiguous(), noise[r::w].contiguous(), flip, vis


def rng_state(d: Dist) -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if d.device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(d.device)
    return st


def restore_rng(st: dict, d: Dist) -> None:
    # Training draws come from (seed, step)-keyed generators; the global states are restored for anything else.
    if "torch" in st:
        torch.set_rng_state(st["torch"])
    if "python" in st:
        random.setstate((3, tuple(st["python"]), None))
    if "cuda" in st and d.device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], d.device)
