"""Backend dispatch: capability-declared backends, first one with no reasons wins.

Backends: ``cuda`` (compiled CUDA kernels), ``triton``, ``cpu`` (compiled C++ kernels), ``torch`` (the
reference), ``flash`` (PyTorch's own FlashAttention kernels; attention ops only). ``auto`` picks per op and
per call; naming one (``MASKDM_BACKEND=triton`` or ``with maskdm_kernels.backend("triton"):``) raises with
every reason it cannot serve the call instead of falling back.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable

import torch

from . import _cpp_lib

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch", "flash")

# op -> backend -> (impl, extra_reasons(**caps) -> list[str])
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable[..., list[str]] | None]]] = {}

# On CUDA tensors `auto` tries these in order. An op's compiled CUDA kernel moves ahead of Triton only once it
# has been verified on a GPU and a committed benchmark in benchmarks/results/ shows it faster.
# H100, bf16, B 256 x 3 x 256 x 256, p 4, block-4 masks at 50% / 90% (2026-11-28-nvidia-h100-80gb-hbm3.md; the
# GPU tests of both backends passed on it): gather+noise CUDA 0.097 / 0.038 ms vs Triton 0.223 / 0.162; loss
# fwd+bwd 0.53 / 0.75 vs 1.01 / 0.88; scatter 0.136 / 0.065 vs 0.150 / 0.071. So CUDA first for the patch ops,
# once verified: the CUDA kernels changed after that run (013d35d: per-token id and cu_seqlens checks in the path
# every token takes; 29f2cab: the scatter's error pass) and have not run on a GPU since, while CI verifies the
# Triton kernels under the interpreter. DESIGN lets no unverified kernel lead `auto`: Triton leads until the GPU
# patch tests pass at a commit with these kernels (then set CUDA_PATCHES_VERIFIED_ON_GPU).
CUDA_PATCHES_VERIFIED_ON_GPU = False
_PATCH_MEASURED_ORDER = ("cuda", "triton", "torch")
_PATCH_GPU_ORDER = _PATCH_MEASURED_ORDER if CUDA_PATCHES_VERIFIED_ON_GPU else ("triton", "cuda", "torch")


class _Orders(dict):
    """op -> GPU order; changing an entry drops the cached choices."""

    def __setitem__(self, op, order):
        super().__setitem__(op, order)
        _CHOICES.clear()


GPU_ORDER: dict[str, tuple[str, ...]] = _Orders({op: _PATCH_GPU_ORDER for op in (
    "gather_patches", "scatter_patches", "masked_noise_loss", "masked_noise_loss_backward")})
_DEFAULT_GPU_ORDER = ("triton", "cuda", "torch")
_CPU_ORDER = ("cpu", "torch")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("maskdm_backend", default=None)

# select()'s answers, keyed by everything they depend on: (op, device, dtype, the backend() block, the two
# environment variables, the determinism flag, caps). Filled on the first call of each key; cleared by register()
# and by a GPU_ORDER change. A failed selection is not cached (it raises every time, with its reasons).
_CHOICES: dict[tuple, tuple[str, Callable]] = {}

# NOTE: os.environ.get of an unset variable costs ~3 us (a KeyError raised and caught inside Mapping.get; this
# repo's CI CPU), more than the rest of a cached select. The raw mapping behind os.environ answers in ~0.05 us and
# sees every os.environ / monkeypatch change (CPython keeps it in sync); os.environ.get where it is missing.
_RAW_ENV = getattr(os.environ, "_data", None)
_encode = getattr(os.environ, "encodekey", None)
if _RAW_ENV is not None and _encode is not None:
    _KEY_BACKEND, _KEY_INTERPRET = _encode("MASKDM_BACKEND"), _encode("TRITON_INTERPRET")
    _env, _decode = _RAW_ENV.get, os.environ.decodevalue
else:  # pragma: no cover  (not CPython)
    _KEY_BACKEND, _KEY_INTERPRET = "MASKDM_BACKEND", "TRITON_INTERPRET"
    _env, _decode = os.environ.get, str


def register(op: str, backend: str, reasons: Callable[..., list[str]] | None = None):
    """Decorator: ``fn`` implements ``op`` on ``backend``; ``reasons(**caps)`` lists op-specific limits."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS[1:]}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = (fn, reasons)
        _CHOICES.clear()
        return fn

    return deco


@contextlib.contextmanager
def backend(name: str):
    """Use backend ``name`` (``auto``, ``cuda``, ``triton``, ``cpu``, ``torch`` or ``flash``) for every op in the
    block."""
    _check_name(name, "backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def current_backend() -> str:
    """The requested backend: the innermost ``backend(...)`` block, else ``MASKDM_BACKEND``, else ``auto``."""
    name = _forced.get()
    if name is None:
        raw = _env(_KEY_BACKEND)
        if raw is None:
            return "auto"
        name = _decode(raw).strip().lower() or "auto"
        _check_name(name, "MASKDM_BACKEND")
    return name


def _check_name(name, what: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{what}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001  (a broken install raises anything: report it as the reason)
        return f"triton is not importable ({type(e).__name__}: {e})"
    return None


def not_supported_reasons(op: str, name: str, device: torch.device, dtype: torch.dtype, **caps) -> list[str]:
    """Why backend ``name`` cannot run ``op`` on tensors of ``device`` / ``dtype`` (empty: it can)."""
    impls = _REGISTRY.get(op, {})
    if name not in impls:
        return [f"{op} has no {name} implementation"]
    device = torch.device(device)
    reasons: list[str] = []
    if name == "cuda":
        if not _cpp_lib.loaded():
            reasons.append(_cpp_lib.unavailable_reason())
        elif not _cpp_lib.has_cuda_kernels():
            why = _cpp_lib.build_info().get("cuda_skip_reason") or "unknown reason"
            reasons.append(f"the extension was built without CUDA kernels ({why})")
        elif device.type == "cuda" and torch.cuda.is_available():
            why = _cpp_lib.device_arch_reason(device.index if device.index is not None else torch.cuda.current_device())
            if why:
                reasons.append(why)
        if device.type != "cuda":
            reasons.append(f"the cuda backend needs CUDA tensors, got {device.type} tensors")
    elif name == "cpu":
        if not _cpp_lib.loaded():
            reasons.append(_cpp_lib.unavailable_reason())
        if device.type != "cpu":
            reasons.append(f"the cpu backend needs CPU tensors, got {device.type} tensors")
    elif name == "triton":
        err = _triton_error()
        if err:
            reasons.append(err)
        if device.type == "cpu":
            if not triton_interpret():
                reasons.append("triton needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")
            elif dtype == torch.bfloat16:
                reasons.append("the Triton interpreter computes bfloat16 wrongly; bf16 runs on a GPU only")
        elif device.type != "cuda":
            reasons.append(f"triton needs CUDA tensors, got {device.type} tensors")
    elif name == "flash" and device.type != "cuda":
        reasons.append(f"the flash backend needs CUDA tensors, got {device.type} tensors")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        reasons.append(f"dtype {dtype} is not supported (float32, float16 or bfloat16)")
    elif dtype == torch.float64 and name != "torch":
        reasons.append("float64 runs on the torch reference backend only")
    extra = impls[name][1]
    if extra is not None:
        reasons += extra(device=device, dtype=dtype, **caps)
    return reasons


def candidates(op: str, device: torch.device) -> tuple[str, ...]:
    if torch.device(device).type == "cuda":
        return GPU_ORDER.get(op, _DEFAULT_GPU_ORDER)
    return _CPU_ORDER


def select(op: str, device: torch.device, dtype: torch.dtype, **caps) -> tuple[str, Callable]:
    """The backend name and implementation for this call, honouring a forced backend.

    Cached: after the first call with the same inputs (see ``_CHOICES``) this is a dict lookup, ~1 us."""
    key = (op, device, dtype, _forced.get(), _env(_KEY_BACKEND), _env(_KEY_INTERPRET),
           torch.are_deterministic_algorithms_enabled(), tuple(caps.items()) if caps else None)
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _CHOICES[key] = _select(op, torch.device(device), dtype, **caps)
    return hit


def _select(op: str, device: torch.device, dtype: torch.dtype, **caps) -> tuple[str, Callable]:
    name = current_backend()
    if name != "auto":
        reasons = not_supported_reasons(op, name, device, dtype, **caps)
        if reasons:
            raise RuntimeError(f"maskdm_kernels: backend {name!r} cannot run {op} here: " + "; ".join(reasons))
        return name, _REGISTRY[op][name][0]
    tried = []
    for cand in candidates(op, device):
        reasons = not_supported_reasons(op, cand, device, dtype, **caps)
        if not reasons:
            return cand, _REGISTRY[op][cand][0]
        tried.append(f"{cand}: " + "; ".join(reasons))
    raise RuntimeError(f"maskdm_kernels: no backend can run {op} on {device} {dtype}: " + " | ".join(tried))


def explain(op: str, device, dtype: torch.dtype, **caps) -> dict[str, list[str]]:
    """For ``info``: every backend's reasons for (op, device, dtype)."""
    return {b: not_supported_reasons(op, b, device, dtype, **caps) for b in BACKENDS[1:]}


def ops() -> list[str]:
    return sorted(_REGISTRY)
