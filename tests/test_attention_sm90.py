"""Ahead-of-time compile of the Triton attention kernels for sm_90 (H100 / H200) with no GPU present.

Checks what can be checked without a GPU: each kernel compiles for ``GPUTarget("cuda", 90, 32)`` in bf16 (the
paper's dtype) with its first Hopper config per head-dim class, its matrix products run on the tensor cores
(``wgmma`` or ``mma`` in the PTX) and ptxas reports no register spills; the schedule (small and large batch) and
preprocess kernels compile spill-free too. The compile runs in a subprocess without
``TRITON_INTERPRET`` (conftest sets it for this process, and interpreted kernels cannot be compiled).
``python tests/test_attention_sm90.py [--all]`` prints the table (``--all``: every config of every set).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

DOT_KERNELS = ("fwd", "dkdv", "dq", "fused")


def _signature(fn, consts: dict):
    """Triton signature dict for ``fn``: bf16 tensors, fp32 statistics, int32 layout, unit head-dim strides as
    constants (Triton specialises a 1 the same way at launch), 16-divisible pointers and row strides."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ("*i32" if name in ("cu_ptr", "sched_ptr")
                         else "*fp32" if name.startswith(("Lse", "Delta", "dQacc")) else "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_all(every_config: bool = False) -> list[dict]:
    """Compile each dot kernel (and the schedule / preprocess kernels) for sm_90; one row per compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from maskdm_kernels.ops import varlen_attention_triton as vat

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    target = GPUTarget("cuda", 90, 32)
    jobs = []
    for name in DOT_KERNELS:
        for head_dim, configs in vat.CONFIGS[name].items():
            for cfg in (configs if every_config else configs[:1]):
                for uniform in (False, True):
                    jobs.append((name, vat._KERNELS[name], head_dim, cfg, uniform))
    plain = triton.Config({}, num_warps=4, num_stages=1)
    jobs += [("schedule", vat._schedule_kernel, 0, plain, {"BLOCK_B": b}) for b in (16, 4096)]
    jobs.append(("preprocess", vat._bwd_preprocess_kernel, 64, plain, {"HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_T": 64}))
    rows = []
    for name, fn, head_dim, cfg, uniform in jobs:
        consts = {n: 1 for n in fn.arg_names if n.startswith("stride") and n.endswith("d")}
        if isinstance(uniform, dict):  # a kernel without products: its constants as given
            consts.update(uniform)
        else:
            consts.update(HEAD_DIM=head_dim, BLOCK_D=head_dim, UNIFORM=uniform, EVEN=False, **cfg.kwargs)
        sig, attrs = _signature(fn, consts)
        row = {"kernel": name, "head_dim": head_dim, "uniform": uniform, "num_warps": cfg.num_warps,
               "num_stages": cfg.num_stages, **cfg.kwargs}
        try:
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                               options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        except Exception as e:  # noqa: BLE001  (reported per kernel, the test fails on it)
            rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            continue
        ptx = k.asm["ptx"]
        row.update(wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
                   shared=getattr(k.metadata, "shared", None))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                               check=False, capture_output=True, text=True, timeout=300)
        finally:
            os.unlink(f.name)
        spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
        regs = re.findall(r"Used (\d+) registers", r.stderr)
        row.update(ptxas_rc=r.returncode, spill_bytes=sum(spills) if spills else None,
                   registers=int(regs[0]) if regs else None)
        rows.append(row)
    return rows


def _api_missing() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401  (only its presence is checked)
        from triton.compiler import ASTSource
    except Exception as e:  # noqa: BLE001
        return f"this triton has no ASTSource / GPUTarget ({type(e).__name__}: {e})"
    import inspect

    params = inspect.signature(ASTSource.__init__).parameters
    if not {"fn", "signature", "constexprs"} <= set(params):
        return f"triton {triton.__version__}'s ASTSource takes {list(params)}, not (fn, signature, constexprs)"
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        return "this triton ships no ptxas"
    return None


@pytest.mark.skipif(_api_missing() is not None, reason=str(_api_missing()))
def test_sm90_tensor_cores_no_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], check=False, capture_output=True,
                       text=True, env=env, cwd=root, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * 2 * len(DOT_KERNELS) + 3
    for row in rows:
        what = f"{row['kernel']} Dh {row['head_dim']} uniform={row['uniform']}"
        assert "error" not in row, f"{what}: {row.get('error')}"
        assert row["ptxas_rc"] == 0, f"{what}: ptxas failed"
        if row["kernel"] in DOT_KERNELS:
            assert row["wgmma"] + row["mma"] > 0, f"{what}: no tensor-core instruction in the PTX"
        assert row["spill_bytes"] == 0, f"{what}: ptxas reports {row['spill_bytes']} bytes of spills ({row})"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = compile_all(every_config="--all" in sys.argv)
    if "--json" in sys.argv:
        print(json.dumps(out))
    else:
        for row in out:
            print(row)
