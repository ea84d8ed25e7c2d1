"""``Visible``: which patches of each image are kept, in a packed (varlen) token layout."""

from __future__ import annotations

import torch
from torch import Tensor


class Visible:
    """The kept (visible) patches of a batch, packed sample-major.

    Fields:
        ids:         int32 ``(T,)`` patch id of each kept token, ascending within a sample;
                     patch id = ``row * (W // p) + col`` on the patch grid.
        cu_seqlens:  int32 ``(B + 1,)``; sample ``i`` owns ``ids[cu_seqlens[i]:cu_seqlens[i + 1]]``.
        max_seqlen:  python int, the longest sample (known on the host; no device sync to read it).
        num_patches: python int, ``N = (H // p) * (W // p)``.
        uniform:     python bool, every sample keeps the same count, so token tensors view as ``(B, Nv, ...)``.

    Use the constructors (``from_index``, ``from_packed``, ``from_mask``, ``full``) rather than ``__init__``.
    """

    __slots__ = ("cu_seqlens", "ids", "max_seqlen", "num_patches", "uniform")

    def __init__(self, ids: Tensor, cu_seqlens: Tensor, max_seqlen: int, num_patches: int, uniform: bool):
        _check_int_tensor("ids", ids, 1)
        _check_int_tensor("cu_seqlens", cu_seqlens, 1)
        if ids.dtype != torch.int32:
            raise TypeError(f"Visible: ids must be int32, got {ids.dtype}")
        if cu_seqlens.dtype != torch.int32:
            raise TypeError(f"Visible: cu_seqlens must be int32, got {cu_seqlens.dtype}")
        if cu_seqlens.numel() < 1:
            raise ValueError("Visible: cu_seqlens must have B + 1 >= 1 entries, got 0")
        if ids.device != cu_seqlens.device:
            raise ValueError(f"Visible: ids is on {ids.device} but cu_seqlens is on {cu_seqlens.device}")
        if not isinstance(num_patches, int) or num_patches < 1:
            raise ValueError(f"Visible: num_patches must be a positive int, got {num_patches!r}")
        if not isinstance(max_seqlen, int) or max_seqlen < 0 or max_seqlen > num_patches:
            raise ValueError(f"Visible: max_seqlen must be an int in [0, num_patches={num_patches}], "
                             f"got {max_seqlen!r}")
        self.ids = ids.contiguous()
        self.cu_seqlens = cu_seqlens.contiguous()
        self.max_seqlen = max_seqlen
        self.num_patches = num_patches
        self.uniform = bool(uniform)

    # ----------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_index(cls, idx: Tensor, num_patches: int) -> Visible:
        """Uniform layout from ``idx (B, Nv)``: the kept patch ids of each sample, any order (sorted here)."""
        _check_int_tensor("idx", idx, 2)
        B, nv = idx.shape
        if nv > num_patches:
            raise ValueError(f"Visible.from_index: idx keeps {nv} patches per sample but num_patches={num_patches}")
        ids = idx.sort(dim=1).values.reshape(-1).to(torch.int32)
        cu = torch.arange(B + 1, device=idx.device, dtype=torch.int32) * nv
        return cls(ids, cu, nv, num_patches, True)

    @classmethod
    def from_packed(cls, ids: Tensor, cu_seqlens: Tensor, num_patches: int, max_seqlen: int | None = None) -> Visible:
        """Varlen layout from packed ``ids (T,)`` and ``cu_seqlens (B + 1,)`` (both int32).

        ``max_seqlen=None`` computes it from ``cu_seqlens``, which costs one device sync."""
        _check_int_tensor("ids", ids, 1)
        _check_int_tensor("cu_seqlens", cu_seqlens, 1)
        if max_seqlen is None:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            max_seqlen = int(lengths.max().item()) if lengths.numel() else 0  # the one sync
        return cls(ids, cu_seqlens, int(max_seqlen), num_patches, False)

    @classmethod
    def from_mask(cls, mask: Tensor) -> Visible:
        """From a boolean ``mask (B, N)`` with True = masked (the paper's convention). Syncs (data-dependent T)."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"Visible.from_mask: mask must be a bool tensor (B, N), got "
                            f"{getattr(mask, 'dtype', type(mask))} {tuple(getattr(mask, 'shape', ()))}")
        B, N = mask.shape
        keep = ~mask
        counts = keep.sum(dim=1, dtype=torch.int32)
        ids = keep.nonzero()[:, 1].to(torch.int32)  # row-major nonzero: sample-major, ascending ids
        cu = torch.zeros(B + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = counts.cumsum(0)
        max_seqlen = int(counts.max().item()) if B else 0
        uniform = bool((counts == counts[:1]).all().item()) if B else True
        return cls(ids, cu, max_seqlen, N, uniform)

    @classmethod
    def full(cls, batch_size: int, num_patches: int, device=None) -> Visible:
        """Every patch visible (fine-tuning and sampling)."""
        ids = torch.arange(num_patches, device=device, dtype=torch.int32).repeat(batch_size)
        cu = torch.arange(batch_size + 1, device=device, dtype=torch.int32) * num_patches
        return cls(ids, cu, num_patches, num_patches, True)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def total(self) -> int:
        """T, the number of kept tokens over the batch."""
        return self.ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        """int32 ``(B,)`` kept tokens per sample."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def sample_index(self) -> Tensor:
        """int64 ``(T,)``: the sample each token belongs to (no host sync)."""
        if self.uniform:
            return torch.arange(self.batch_size, device=self.device).repeat_interleave(self.max_seqlen)
        return sample_index(self.cu_seqlens, self.total)

    def to(self, device) -> Visible:
        return Visible(self.ids.to(device), self.cu_seqlens.to(device), self.max_seqlen, self.num_patches,
                       self.uniform)

    def __repr__(self) -> str:
        return (f"Visible(batch_size={self.batch_size}, total={self.total}, max_seqlen={self.max_seqlen}, "
                f"num_patches={self.num_patches}, uniform={self.uniform}, device={self.device})")


def sample_index(cu_seqlens: Tensor, total: int) -> Tensor:
    """int64 ``(T,)``: the sample of each packed token, from ``cu_seqlens (B + 1,)`` and ``T = total``.

    No host sync: ``output_size`` gives the length, so this traces under ``torch.compile`` and captures in a
    CUDA graph. ``cu_seqlens`` must be valid (non-decreasing, ending at ``total``)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths,
                                   output_size=total)


def _check_int_tensor(name: str, t, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Visible: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"Visible: {name} must be an integer tensor, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"Visible: {name} must be {dim}-D, got shape {tuple(t.shape)}")
