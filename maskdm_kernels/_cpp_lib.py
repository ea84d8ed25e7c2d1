"""Loads the compiled extension ``maskdm_kernels._C`` if it was built; never raises at import.

A missing or broken extension only makes the ``cpu`` and ``cuda`` backends unavailable, with the reason."""

from __future__ import annotations

import importlib

_C = None
LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("maskdm_kernels._C")
except Exception as e:  # noqa: BLE001  (ImportError, or an undefined symbol from a build against another torch)
    LOAD_ERROR = f"{type(e).__name__}: {e}"


def build_info() -> dict:
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return {"built": False, "reason": "no build was run (the package is used from its source tree)"}
    return dict(BUILD_INFO)


def loaded() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", False))


def has_kernel(name: str) -> bool:
    """True when the extension registered ``torch.ops.maskdm.<name>``."""
    if _C is None:
        return False
    import torch

    return hasattr(torch.ops.maskdm, name)


def unavailable_reason() -> str | None:
    if _C is not None:
        return None
    info = build_info()
    if not info.get("built", False):
        return f"the C++/CUDA extension was not built ({info.get('reason', 'unknown reason')})"
    return f"the C++/CUDA extension failed to load ({LOAD_ERROR})"
