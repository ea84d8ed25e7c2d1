"""Shared pieces of the benchmark suites: devices, shapes, block masks, timing and throughput units."""

from __future__ import annotations

import contextlib

import pytest
import torch

import maskdm_kernels as mk
from maskdm_kernels.dispatch import not_supported_reasons

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# Paper shape on a GPU (CelebA-HQ 256, p=4, batch 256); a small one on CPU.
PATCH_SHAPE = ({"batch": 256, "channels": 3, "size": 256, "patch": 4} if ON_GPU
               else {"batch": 64, "channels": 3, "size": 64, "patch": 4})
PATCH_DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def timed(fn):
    """The benchmarked callable: runs ``fn`` and waits for the device, so the time is the kernel's.

    ``run.raw`` is ``fn`` itself, for the GPU timing in :func:`record` (CUDA events, no host sync per call)."""

    def run():
        out = fn()
        sync()
        return out

    run.raw = fn
    return run


def device_median_s(fn) -> float:
    """GPU time of one call of ``fn``: median over ~100 ms of calls timed with CUDA events, L2 flushed before
    each (``triton.testing.do_bench``), so memory-bound kernels are not timed out of the cache and microsecond
    kernels are not timed with a host sync around them."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def block_mask(batch: int, grid: int, ratio: float, block: int = 4, device=DEVICE, seed: int = 0) -> torch.Tensor:
    """Boolean ``(B, grid*grid)`` mask, True = masked: ``int(ratio * N) // block**2`` random whole blocks."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nb = (grid // block) ** 2
    n_masked = int(ratio * grid * grid) // (block * block)
    blocks = torch.rand(batch, nb, generator=g).argsort(dim=1) < n_masked  # (B, nb) True = masked block
    blocks = blocks.view(batch, grid // block, 1, grid // block, 1)
    return blocks.expand(-1, -1, block, -1, block).reshape(batch, grid * grid).to(device)


def backend_providers(op: str, dtype: torch.dtype) -> list:
    """Each backend that can run ``op`` here, as pytest params; the rest skipped with the dispatcher's reason.

    The interpreted Triton backend is not a performance number, so it is skipped on CPU."""
    params = []
    for name in ("cuda", "triton", "cpu", "torch"):
        reasons = not_supported_reasons(op, name, torch.device(DEVICE), dtype)
        if name == "triton" and not ON_GPU:
            reasons = ["an interpreted Triton time is not a performance number"]
        marks = [pytest.mark.skip(reason="; ".join(reasons))] if reasons else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def graph_median_s(fn) -> float | None:
    """GPU time of one call of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): the
    kernels alone, without the host's launch and Python overhead that :func:`device_median_s` includes when the
    host is slower than the kernels. L2 is not flushed between calls. None when ``fn`` cannot be captured."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
    except Exception:  # noqa: BLE001  (a host sync or an uncapturable op: report no graph time)
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return None


def record(benchmark, fn=None, *, graph: bool = True, bytes_moved: float | None = None,
           flops: float | None = None, **extra) -> None:
    """Put throughput beside the time: GB/s on the given bytes, TFLOP/s on the given flops.

    On a GPU the time is :func:`device_median_s` of ``fn`` (stored as ``device_median_ms``), and with ``graph``
    also :func:`graph_median_s` (``graph_median_ms``, with ``GB/s graph`` / ``TFLOP/s graph``): where the two differ
    the call is host-bound. Pass ``graph=False`` for providers that sync the host (they cannot be captured).
    pytest-benchmark's own median (a host clock around call + sync) is kept beside them. On CPU the time is
    pytest-benchmark's median."""
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable (a smoke run: nothing was timed)
    med = stats.stats.median if stats is not None else None
    graph_s = None
    if ON_GPU and fn is not None:
        raw = getattr(fn, "raw", fn)
        med = device_median_s(raw)
        benchmark.extra_info["device_median_ms"] = round(med * 1e3, 5)
        if graph:
            graph_s = graph_median_s(raw)
            benchmark.extra_info["graph_median_ms"] = None if graph_s is None else round(graph_s * 1e3, 5)
    benchmark.extra_info.update(extra)
    benchmark.extra_info["device"] = torch.cuda.get_device_name(0) if ON_GPU else "cpu"
    if med is None:
        return
    if bytes_moved is not None:
        benchmark.extra_info["bytes"] = int(bytes_moved)
        benchmark.extra_info["GB/s"] = round(bytes_moved / med / 1e9, 2)
        if graph_s:
            benchmark.extra_info["GB/s graph"] = round(bytes_moved / graph_s / 1e9, 2)
    if flops is not None:
        benchmark.extra_info["flops"] = int(flops)
        benchmark.extra_info["TFLOP/s"] = round(flops / med / 1e12, 3)
        if graph_s:
            benchmark.extra_info["TFLOP/s graph"] = round(flops / graph_s / 1e12, 3)


def visible_from_mask(mask: torch.Tensor) -> mk.Visible:
    # Uniform block masks: every sample keeps the same count, so build the uniform layout without a sync.
    _B, N = mask.shape
    keep = (~mask).int()
    nv = int(keep[0].sum())
    idx = keep.argsort(dim=1, descending=True, stable=True)[:, :nv]
    return mk.Visible.from_index(idx, N)
