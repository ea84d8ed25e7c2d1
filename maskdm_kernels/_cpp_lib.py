"""Loads the compiled extension ``maskdm_kernels._C`` if it was built; never raises at import.

A missing or broken extension only makes the ``cpu`` and ``cuda`` backends unavailable, with the reason."""

from __future__ import annotations

import functools
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


def arch_reason(archs: str | None, capability: tuple[int, int]) -> str | None:
    """Why CUDA kernels built for ``archs`` (``TORCH_CUDA_ARCH_LIST`` form: ``"8.0;9.0+PTX"``) cannot run on a GPU
    of compute ``capability``, or None. A cubin runs on its major with an equal or higher minor (``9.0a`` on 9.0
    only, ``10.0f`` on 10.x); PTX is compiled by the driver for its own arch or any later one. Unknown ``archs``:
    None (cannot tell)."""
    if not archs:
        return None
    for entry in archs.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        base = entry.removesuffix("+PTX")
        specific = base.endswith("a")  # sm_90a: that exact GPU; sm_100f: its family, like a plain cubin
        try:
            major, minor = (int(x) for x in base.rstrip("af").split("."))
        except ValueError:
            return None  # a form this check does not know: let the launch decide
        if (major, minor) == capability or (major == capability[0] and minor <= capability[1] and not specific):
            return None
        if ptx and (major, minor) <= capability:
            return None
    return (f"the CUDA kernels were built for {archs}, which has no code an sm_{capability[0]}{capability[1]} GPU "
            f"runs (rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]})")


@functools.cache
def device_arch_reason(index: int) -> str | None:
    """``arch_reason`` for CUDA device ``index`` and this build (cached: one capability query per device)."""
    import torch

    return arch_reason(build_info().get("cuda_archs"), torch.cuda.get_device_capability(index))
