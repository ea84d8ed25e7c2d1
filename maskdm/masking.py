"""Mask generators: which patches each image keeps, as a ``maskdm_kernels.Visible``.

Every generator is vectorised over the batch (no per-sample Python loop), runs its per-patch draws on the
device, and never syncs with the host: the token count ``T`` and ``max_seqlen`` are python ints decided on
the host before any kernel runs.

Ratios follow the paper: ``ratio`` is the masked fraction; ``random_patches`` masks ``int(ratio * N)``
patches, ``block_patches`` masks ``int(ratio * N) // block_size**2`` whole ``block_size x block_size`` blocks.
A ``(low, high)`` ratio draws one ratio per sample, uniform in ``[low, high]``: the layout is varlen. Those
per-sample counts are drawn on the host (B numbers, so ``T`` and ``max_seqlen`` are known without a sync):
from ``generator`` when it is a CPU generator, else from PyTorch's global CPU generator.

Random numbers come from ``generator`` when given (drawn on the generator's device, then moved to
``device``), else from the global generator of ``device``. The same generator state gives the same masks.

Static capacity (for compiled / graph-captured steps): a varlen layout changes ``T`` and ``max_seqlen`` every
step, so every step would be a new shape. ``static_capacity`` fixes a token capacity and a sequence count from
the ratio range alone; ``pad_to_capacity`` fills the gap with ``fillers`` extra (filler) samples whose tokens a
step gives loss weight 0 and whose images are zero rows appended to the batch, so every index stays in bounds.
Every sequence of the padded layout, filler or real, is at most ``max_seqlen`` long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from maskdm_kernels import Visible
from maskdm_kernels.layout import sample_index

__all__ = ["StaticCapacity", "block_patches", "crop_patches", "pad_batch", "pad_to_capacity", "random_patches",
           "static_capacity"]


def random_patches(batch_size: int, grid_size, ratio, device=None, generator: torch.Generator | None = None
                   ) -> Visible:
    """Mask ``int(ratio * N)`` random patches of each sample (``N = rows * cols``).

    Args:
        batch_size: B.
        grid_size: the patch grid, ``n`` (square) or ``(rows, cols)``.
        ratio: masked fraction in ``[0, 1)``, or a ``(low, high)`` pair for a per-sample ratio (varlen).
        device: where the ``Visible`` lives (default: the generator's device, else CPU).
        generator: optional ``torch.Generator`` for reproducible masks.
    """
    rows, cols = _grid(grid_size, "random_patches")
    N = rows * cols
    device = _device(device, generator)
    kept = _kept_counts("random_patches", batch_size, ratio, N, 1, generator)
    return _pack(_keep_lowest(_rand((batch_size, N), device, generator), kept), kept)


def block_patches(batch_size: int, grid_size, ratio, block_size: int = 4, device=None,
                  generator: torch.Generator | None = None) -> Visible:
    """Mask ``int(ratio * N) // block_size**2`` random whole ``block_size x block_size`` blocks per sample.

    The grid must be tiled exactly by the blocks (``block_size`` divides rows and cols). Arguments as in
    ``random_patches``. Example: a 64 x 64 grid (256x256, p=4), block 4, ratio 0.9 masks 230 of 256 blocks
    and keeps 416 patches.
    """
    rows, cols = _grid(grid_size, "block_patches")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_patches: block_size must be a positive int, got {block_size!r}")
    if rows % block_size or cols % block_size:
        raise ValueError(f"block_patches: block_size={block_size} must divide the patch grid {rows}x{cols} "
                         f"(the grid is tiled into whole blocks); pick a block size that divides both")
    N, b = rows * cols, block_size
    br, bc = rows // b, cols // b
    device = _device(device, generator)
    kept_blocks = _kept_counts("block_patches", batch_size, ratio, N, b * b, generator)
    keep_block = _keep_lowest(_rand((batch_size, br * bc), device, generator), kept_blocks)  # (B, blocks)
    r = torch.arange(rows, device=device) // b
    c = torch.arange(cols, device=device) // b
    block_of = (r[:, None] * bc + c[None, :]).reshape(-1)  # (N,) block id of each patch
    kept = [n * b * b for n in kept_blocks] if isinstance(kept_blocks, list) else kept_blocks * b * b
    return _pack(keep_block[:, block_of], kept)


def crop_patches(batch_size: int, grid_size, crop_size, device=None,
                 generator: torch.Generator | None = None) -> Visible:
    """Keep one random ``crop_size x crop_size`` window of patches per sample (``crop_size`` an int or
    ``(h, w)``, in patches, at most the grid), mask the rest. Uniform layout."""
    rows, cols = _grid(grid_size, "crop_patches")
    ch, cw = _pair(crop_size, "crop_patches", "crop_size")
    if not (1 <= ch <= rows and 1 <= cw <= cols):
        raise ValueError(f"crop_patches: crop_size {ch}x{cw} must fit in the patch grid {rows}x{cols}")
    device = _device(device, generator)
    u = _rand((batch_size, 2), device, generator)
    top = (u[:, 0] * (rows - ch + 1)).long().clamp_max(rows - ch)  # uniform in [0, rows - ch]
    left = (u[:, 1] * (cols - cw + 1)).long().clamp_max(cols - cw)
    r = top[:, None] + torch.arange(ch, device=device)  # (B, ch)
    c = left[:, None] + torch.arange(cw, device=device)  # (B, cw)
    ids = (r[:, :, None] * cols + c[:, None, :]).reshape(batch_size, ch * cw)  # ascending already
    cu = torch.arange(batch_size + 1, device=device, dtype=torch.int32) * (ch * cw)
    return Visible(ids.to(torch.int32).reshape(-1), cu, ch * cw, rows * cols, True)


# ---------------------------------------------------------------------------------------------- static capacity
@dataclass(frozen=True)
class StaticCapacity:
    """Fixed shapes for every varlen layout of one mask setting.

    batch_size: B real samples; fillers: F filler samples after them; tokens: ``T_cap``, the packed length of
    every padded layout; max_seqlen: the longest sample any ratio in the range keeps (``kmax``); min_seqlen: the
    shortest (``kmin``). ``tokens < B * kmax`` (a ``slack`` capacity) can be exceeded by a draw: ``fits`` says
    whether a layout does, and ``guaranteed()`` is the capacity every draw fits (``B * kmax`` tokens)."""

    batch_size: int
    fillers: int
    tokens: int
    max_seqlen: int
    num_patches: int
    min_seqlen: int = 0

    def fits(self, vis: Visible) -> bool:
        return vis.total <= self.tokens and vis.max_seqlen <= self.max_seqlen

    def guaranteed(self) -> StaticCapacity:
        return _capacity(self.batch_size, self.max_seqlen, self.min_seqlen, self.num_patches,
                         self.batch_size * self.max_seqlen)


def static_capacity(batch_size: int, grid_size, ratio, block_size: int = 1,
                    slack: float | None = None) -> StaticCapacity:
    """The capacity of ``random_patches`` (``block_size=1``) or ``block_patches`` layouts with ``ratio``.

    ``ratio`` a float (uniform: no fillers needed, ``fillers=0``) or ``(low, high)``. A sample keeps at most
    ``kmax`` (at ratio ``low``) and at least ``kmin`` (at ``high``) patches. ``slack=None``: ``T_cap = B kmax``, which
    every draw fits; the filler total ``T_cap - T`` is then in ``[0, B (kmax - kmin)]``, held by
    ``ceil(B (kmax - kmin) / kmax)`` fillers of at most ``kmax`` tokens. It costs: the padded step runs ``T_cap``
    tokens, at [0.75, 0.95] on average 1.64x the real ones. ``slack=s``: ``T_cap`` = the mean of ``T`` plus ``s``
    standard deviations (the per-sample counts are independent draws), at most ``B kmax``. Block-4 masks on a 64x64
    grid at [0.75, 0.95], s=4: 1.27x the mean real tokens at B=32, 1.13x at B=128 (against 1.64x for
    ``slack=None``); a draw exceeds it with probability ~3e-5 (normal approximation; none in 20k draws checked),
    and that step uses ``guaranteed()``."""
    rows, cols = _grid(grid_size, "static_capacity")
    N, unit = rows * cols, block_size * block_size
    lo, hi = (ratio, ratio) if not isinstance(ratio, (tuple, list)) else (float(ratio[0]), float(ratio[1]))
    units = N // unit
    kmax = (units - int(lo * N) // unit) * unit
    kmin = (units - int(hi * N) // unit) * unit
    if kmax < 1:
        raise ValueError(f"static_capacity: ratio {ratio!r} keeps no patch of {N}; nothing to train on")
    tokens = batch_size * kmax
    if slack is not None and kmax > kmin:
        m = 4096  # the kept count at evenly spaced ratios of the range: its mean and variance per sample
        kept = [(units - int((lo + (hi - lo) * (i + 0.5) / m) * N) // unit) * unit for i in range(m)]
        mean = sum(kept) / m
        var = sum((k - mean) ** 2 for k in kept) / m
        tokens = min(tokens, max(batch_size * kmin, math.ceil(batch_size * mean + slack * math.sqrt(batch_size * var))))
    return _capacity(batch_size, kmax, kmin, N, tokens)


def _capacity(B: int, kmax: int, kmin: int, N: int, tokens: int) -> StaticCapacity:
    fillers = 0 if kmax == kmin else -(-(tokens - B * kmin) // kmax)  # hold the most padding: T = B * kmin
    return StaticCapacity(B, fillers, tokens, kmax, N, kmin)


def pad_to_capacity(vis: Visible, cap: StaticCapacity) -> Visible:
    """``vis`` (B samples, ``T <= cap.tokens`` tokens) followed by ``cap.fillers`` filler samples that hold the
    remaining ``cap.tokens - T`` tokens, ``max_seqlen`` tokens each in order (the last ones may be empty).

    Returns a varlen ``Visible`` of ``B + F`` samples, ``cap.tokens`` tokens and ``max_seqlen = cap.max_seqlen``
    whatever ``vis`` was: shapes and python ints depend on ``cap`` only. Filler ids are ``0, 1, ...`` within each
    filler (ascending, valid patch ids). No host sync (``T`` is a python int)."""
    B, T, k = vis.batch_size, vis.total, cap.max_seqlen
    if B != cap.batch_size or vis.num_patches != cap.num_patches:
        raise ValueError(f"pad_to_capacity: vis has batch {B} and {vis.num_patches} patches, the capacity was made "
                         f"for batch {cap.batch_size} and {cap.num_patches} patches")
    rest = cap.tokens - T
    if vis.max_seqlen > k or rest < 0 or rest > cap.fillers * k:
        raise ValueError(f"pad_to_capacity: vis (T={T}, max_seqlen={vis.max_seqlen}) does not fit the capacity "
                         f"(tokens={cap.tokens}, max_seqlen={k}, fillers={cap.fillers}): was it drawn with the "
                         f"ratio the capacity was made for? (a slack capacity: check cap.fits(vis), else use "
                         f"cap.guaranteed())")
    dev = vis.device
    fill_ids = (torch.arange(rest, device=dev) % k).to(torch.int32)
    ends = (torch.arange(1, cap.fillers + 1, device=dev) * k).clamp_max(rest) + T
    cu = torch.cat([vis.cu_seqlens, ends.to(torch.int32)])
    return Visible(torch.cat([vis.ids, fill_ids]), cu, k, vis.num_patches, False)


def pad_batch(x0: Tensor, t: Tensor, noise: Tensor, vis: Visible, cap: StaticCapacity,
              zeros: Tensor | None = None, weight: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Visible, Tensor]:
    """A varlen batch on its static-capacity layout: ``(x0, t, noise, vis, weight)`` of ``B + F`` samples.

    The ``F`` filler samples get zero images and noise (their tokens are zeros: finite, and every gather index
    is in bounds), timestep 0 and loss weight 0; the real samples get weight ``(B + F) / B``, so the mean over
    ``B + F`` samples that ``masked_noise_loss`` takes is the mean over the ``B`` real ones: the same loss and
    gradients as the exact layout. ``zeros`` ``(F, C, H, W)`` and ``weight`` ``(B + F,)``: cached ones."""
    B, F = x0.shape[0], cap.fillers
    if zeros is None:
        zeros = x0.new_zeros(F, *x0.shape[1:])
    if weight is None:
        weight = torch.cat([torch.full((B,), (B + F) / B, device=x0.device), torch.zeros(F, device=x0.device)])
    return (torch.cat([x0, zeros.to(x0.dtype)]), torch.cat([t, t.new_zeros(F)]),
            torch.cat([noise, zeros.to(noise.dtype)]), pad_to_capacity(vis, cap), weight)


# ------------------------------------------------------------------------------------------------- helpers
def _keep_lowest(scores: Tensor, kept) -> Tensor:
    """bool ``(B, n)``: in each row, the ``kept[b]`` entries with the lowest scores (``kept`` an int or B ints)."""
    B, n = scores.shape
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=scores.device).expand(B, n))
    if isinstance(kept, int):
        return rank < kept
    return rank < to_device(torch.tensor(kept, dtype=torch.long), scores.device)[:, None]


def _pack(keep: Tensor, kept) -> Visible:
    """``Visible`` from a bool keep mask ``(B, N)`` whose row counts are known on the host (``kept``: an int or
    B ints), without a sync: kept ids move to the front of each row in ascending order, then are read out."""
    B, N = keep.shape
    device = keep.device
    ar = torch.arange(N, device=device)
    front = torch.where(keep, ar, ar + N).sort(dim=1).values  # (B, N): kept ids ascending, then masked ones
    if isinstance(kept, int):
        ids = front[:, :kept].reshape(-1)
        cu = torch.arange(B + 1, device=device, dtype=torch.int32) * kept
        return Visible(ids.to(torch.int32), cu, kept, N, True)
    total = sum(kept)
    lengths = to_device(torch.tensor(kept, dtype=torch.long), device)
    cu = torch.zeros(B + 1, dtype=torch.long, device=device)
    cu[1:] = lengths.cumsum(0)
    sample = sample_index(cu, total)
    ids = front[sample, torch.arange(total, device=device) - cu[sample]]
    return Visible(ids.to(torch.int32), cu.to(torch.int32), max(kept), N, False)


def _kept_counts(fn: str, B: int, ratio, N: int, unit: int, generator) -> int | list[int]:
    """Kept units (patches or blocks of ``unit`` patches) per sample: an int, or a host list for a range."""
    if not isinstance(B, int) or B < 1:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {B!r}")
    units = N // unit
    if isinstance(ratio, (tuple, list)):
        if len(ratio) != 2:
            raise ValueError(f"{fn}: ratio must be a float or a (low, high) pair, got {ratio!r}")
        low, high = (float(r) for r in ratio)
        _check_ratio(fn, low)
        _check_ratio(fn, high)
        if low > high:
            raise ValueError(f"{fn}: ratio (low, high) needs low <= high, got {ratio!r}")
        g = generator if generator is not None and generator.device.type == "cpu" else None
        r = (low + (high - low) * torch.rand(B, generator=g, dtype=torch.float64)).tolist()  # host tensor
        return [units - int(x * N) // unit for x in r]
    ratio = float(ratio)
    _check_ratio(fn, ratio)
    return units - int(ratio * N) // unit


def _check_ratio(fn: str, r: float) -> None:
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{fn}: mask ratio must be in [0, 1) (the masked fraction), got {r}")


def _rand(shape, device, generator) -> Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return to_device(torch.rand(shape, generator=generator, device=generator.device), device)


def to_device(t: Tensor, device) -> Tensor:
    """Move a host tensor to ``device`` without making the host wait for the GPU (pinned, non-blocking)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _device(device, generator) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _grid(grid_size, fn: str) -> tuple[int, int]:
    rows, cols = _pair(grid_size, fn, "grid_size")
    if rows < 1 or cols < 1:
        raise ValueError(f"{fn}: grid_size must be positive, got {grid_size!r}")
    return rows, cols


def _pair(v, fn: str, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(s, int) for s in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"{fn}: {name} must be an int or a (rows, cols) pair of ints, got {v!r}")
