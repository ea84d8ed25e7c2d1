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
        if cu_seqlens.numel() == 1 and ids.numel():  # known from shapes: no value of cu_seqlens can hold them
            raise ValueError(f"Visible: cu_seqlens has one entry (B = 0) but ids holds {ids.numel()} tokens")
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
        srt = idx.sort(dim=1).values
        if srt.device.type == "cpu" and srt.numel():  # host values: checked for free (no device sync)
            bad = (srt[:, 0] < 0) | (srt[:, -1] >= num_patches)
            if bad.any():
                b = int(bad.nonzero()[0, 0])
                raise ValueError(f"Visible.from_index: idx[{b}] holds a patch id outside [0, num_patches="
                                 f"{num_patches}): {idx[b].tolist()}")
            dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
            if dup.any():
                b = int(dup.nonzero()[0, 0])
                raise ValueError(f"Visible.from_index: idx[{b}] repeats a patch id: {idx[b].tolist()}")
        ids = srt.reshape(-1).to(torch.int32)
        cu = torch.arange(B + 1, device=idx.device, dtype=torch.int32) * nv
        return cls(ids, cu, nv, num_patches, True)

    @classmethod
    def from_packed(cls, ids: Tensor, cu_seqlens: Tensor, num_patches: int, max_seqlen: int | None = None) -> Visible:
        """Varlen layout from packed ``ids (T,)`` and ``cu_seqlens (B + 1,)`` (both int32).

        ``max_seqlen=None`` computes it from ``cu_seqlens``, which costs one device sync. Values are checked
        (``validate``) where that costs no extra sync: all of them for CPU tensors, ``cu_seqlens`` when it is
        read for ``max_seqlen``; call ``validate()`` to check device ids too."""
        _check_int_tensor("ids", ids, 1)
        _check_int_tensor("cu_seqlens", cu_seqlens, 1)
        on_host = ids.device.type == "cpu" and cu_seqlens.device.type == "cpu"
        if max_seqlen is None:
            cu = cu_seqlens.cpu()  # the one sync
            _raise_first(_cu_errors(cu, ids.shape[0]))
            max_seqlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        vis = cls(ids, cu_seqlens, int(max_seqlen), num_patches, False)
        if on_host:
            vis.validate()
        return vis

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
        for name, v, low in (("batch_size", batch_size, 0), ("num_patches", num_patches, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"Visible.full: {name} must be an int >= {low}, got {v!r}")
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

    def validate(self) -> Visible:
        """Check the values (one device sync: both tensors are read on the host) and return ``self``.

        Raises ValueError naming the field: ``cu_seqlens`` not starting at 0, decreasing, or not ending at T;
        ``ids`` outside ``[0, num_patches)``, not ascending within a sample, or repeated within one;
        ``max_seqlen`` below the longest sample; ``uniform`` with unequal lengths. The ops never need this to stay
        memory-safe (bad values give NaN on the device, an error on the C++ CPU kernels); it finds the bad field."""
        cu, ids = self.cu_seqlens.cpu(), self.ids.cpu().long()
        _raise_first(_cu_errors(cu, ids.shape[0]))
        errors = []
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_patches:
                t = int(((ids < 0) | (ids >= self.num_patches)).nonzero()[0, 0])
                errors.append(f"ids[{t}]={int(ids[t])} is outside [0, num_patches={self.num_patches})")
            same = sample_index(cu, ids.shape[0])
            step = ids[1:] - ids[:-1]
            inside = same[1:] == same[:-1]
            for bad, what in ((inside & (step == 0), "repeats a patch id"), (inside & (step < 0), "is not ascending")):
                if bad.any():
                    t = int(bad.nonzero()[0, 0])
                    errors.append(f"ids {what} within sample {int(same[t])} (ids[{t}]={int(ids[t])}, "
                                  f"ids[{t + 1}]={int(ids[t + 1])})")
        lengths = cu[1:] - cu[:-1]
        longest = int(lengths.max()) if lengths.numel() else 0
        if self.max_seqlen < longest:
            errors.append(f"max_seqlen={self.max_seqlen} is below the longest sample ({longest} tokens)")
        if self.uniform and lengths.numel() and bool((lengths != lengths[0]).any()):
            errors.append(f"uniform=True but the samples' lengths differ ({lengths.tolist()[:8]}...)")
        _raise_first(errors)
        return self

    def to(self, device) -> Visible:
        return Visible(self.ids.to(device), self.cu_seqlens.to(device), self.max_seqlen, self.num_patches,
                       self.uniform)

    def __repr__(self) -> str:
        return (f"Visible(batch_size={self.batch_size}, total={self.total}, max_seqlen={self.max_seqlen}, "
                f"num_patches={self.num_patches}, uniform={self.uniform}, device={self.device})")


def sample_index(cu_seqlens: Tensor, total: int) -> Tensor:
    """int64 ``(T,)``: the sample of each packed token, from ``cu_seqlens (B + 1,)`` and ``T = total``.

    Token t belongs to the largest b with ``cu_seqlens[b] <= t`` (empty samples own nothing), as in the kernels.
    No host sync and a static shape, so it traces under ``torch.compile`` and captures in a CUDA graph. Any
    values are safe: the result always lies in ``[0, B)`` (meaningless, but in bounds, for a malformed
    ``cu_seqlens``)."""
    t = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    last = max(cu_seqlens.shape[0] - 2, 0)
    return (torch.searchsorted(cu_seqlens, t, right=True) - 1).clamp_(0, last)


def _cu_errors(cu: Tensor, total: int) -> list[str]:
    """What is wrong with host ``cu_seqlens (B + 1,)`` for ``total`` tokens (empty: nothing)."""
    if int(cu[0]) != 0:
        return [f"cu_seqlens[0] must be 0, got {int(cu[0])}"]
    down = (cu[1:] < cu[:-1]).nonzero()
    if down.numel():
        i = int(down[0, 0])
        return [f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}]={int(cu[i])} > cu_seqlens[{i + 1}]="
                + str(int(cu[i + 1]))]
    if int(cu[-1]) != total:
        return [f"cu_seqlens[-1] must equal T={total} (the number of ids), got {int(cu[-1])}"]
    return []


def _raise_first(errors: list[str]) -> None:
    if errors:
        raise ValueError("Visible: " + "; ".join(errors))


def _check_int_tensor(name: str, t, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"Visible: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"Visible: {name} must be an integer tensor, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"Visible: {name} must be {dim}-D, got shape {tuple(t.shape)}")
