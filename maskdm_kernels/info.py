"""``python -m maskdm_kernels.info``: what was built, and which backend each op uses here and why."""

from __future__ import annotations

import platform

import torch

import maskdm_kernels  # importing the package imports every op module, and each registers its backends

from . import _cpp_lib, dispatch


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
            lines.append(f"  {op}: auto -> {pick or 'none'}{_eager_note(op, dev, pick)}")
            for b, rs in reasons.items():
                if b == pick:
                    continue
                lines.append(f"      {b}: " + ("available (not first in the auto order)" if not rs else "; ".join(rs)))
    lines += attention_rules()
    return "\n".join(lines)


def _eager_note(op: str, dev: torch.device, pick: str | None) -> str:
    from .ops import varlen_attention_torch

    if op in ("attention", "varlen_attention") and dev.type == "cpu" and pick == "torch":
        return (" (eager calls: in C++, csrc/attention_cpu.cpp)" if varlen_attention_torch.EAGER_CPU is not None
                else " (eager calls: in Python; the extension's C++ path is not built)")
    return ""


def attention_rules() -> list[str]:
    """Which attention kernel each shape class gets on CUDA under ``auto``, and why (the evidence is noted beside
    ``AUTO_ORDER`` in ops/varlen_attention.py and ``GPU_ORDER`` in ops/attention.py)."""
    from .ops import attention as at
    from .ops import varlen_attention as va
    from .ops import varlen_attention_triton as vt

    det = torch.are_deterministic_algorithms_enabled()
    lines = ["", "attention on CUDA tensors under auto (first backend that can run; order per shape class):",
             (f"  attention (B, N, H, Dh): {' > '.join(dispatch.GPU_ORDER[at.OP])} (SDPA ahead on every uniform"
              " fwd+bwd of the H100 run of 2026-11-28; Triton ahead by <= 4% on two long forwards)")]
    classes = {"uniform-short": f"uniform, max_seqlen <= {va.SHORT_UNIFORM}",
               "uniform-long": f"uniform, max_seqlen > {va.SHORT_UNIFORM}", "varlen": "varlen (lengths differ)",
               "varlen-many": f"varlen, more than {va.TRITON_MAX_VARLEN_BATCH} sequences (Triton declines)"}
    for cls, desc in classes.items():
        fwd, bwd = va.AUTO_ORDER[(va.OP, cls)], va.AUTO_ORDER[(va.OP_BWD, cls)]
        if det:
            bwd = tuple(b for b in bwd if b != "flash")
        lines.append(f"  varlen_attention {desc}: forward {' > '.join(fwd)}; backward {' > '.join(bwd)}")
    lines += [
        "  why: torch.nn.attention.varlen (FlashAttention-2, or cuDNN) beat the Triton kernels of 2026-11-28 on H100",
        "       at N <= 417 (fwd and fwd+bwd) and on the varlen backward; Triton won N >= 1025 and the varlen",
        "       forward. The flash backward is not deterministic: skipped while",
        f"       torch.are_deterministic_algorithms_enabled() (now {det}).",
        ("  flash leads only once its own code has passed the GPU tests (va.FLASH_VERIFIED_ON_GPU = "
         f"{va.FLASH_VERIFIED_ON_GPU}); until then Triton leads every class and flash is second."),
        f"  Triton backward: one fused program per (sequence, head) up to max_seqlen {vt.FUSED_BWD_MAX_SEQLEN},",
        "       else dK/dV + dQ kernels; both deterministic.",
        "  The Triton kernels changed since that run (5-product backward, one-loop forward, longest-first grid):",
        "       unmeasured on a GPU; the GPU suite's attention phase re-decides these orders.",
    ]
    return lines


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
