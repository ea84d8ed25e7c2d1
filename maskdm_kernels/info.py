"""``python -m maskdm_kernels.info``: what was built, and which backend each op uses here and why."""

from __future__ import annotations

import platform

import torch

import maskdm_kernels

from . import _cpp_lib, dispatch
from . import ops as _ops  # noqa: F401  (registers every op)


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001  (info must print whatever is broken, not die on it)
        v["triton"] = f"unavailable ({type(e).__name__})"
    v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    return v


def report() -> str:
    lines = ["maskdm_kernels " + maskdm_kernels.__version__, ""]
    lines += [f"{k:>12}: {v}" for k, v in _versions().items()]
    lines += ["", "build:"]
    for k, v in _cpp_lib.build_info().items():
        lines.append(f"{k:>18}: {v}")
    lines.append(f"{'extension':>18}: " + ("loaded" if _cpp_lib.loaded() else _cpp_lib.unavailable_reason()))
    lines.append(f"{'requested backend':>18}: {dispatch.current_backend()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    for dev in devices:
        lines += ["", f"ops on {dev.type} tensors ({dtype}):"]
        for op in dispatch.ops():
            caps = {"head_dim": 64} if "attention" in op else {}
            reasons = dispatch.explain(op, dev, dtype, **caps)
            order = dispatch.candidates(op, dev)
            pick = next((b for b in order if not reasons[b]), None)
            lines.append(f"  {op}: auto -> {pick or 'none'}")
            for b, rs in reasons.items():
                if b == pick:
                    continue
                lines.append(f"      {b}: " + ("available (not first in the auto order)" if not rs else "; ".join(rs)))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
