"""Ahead-of-time compile of every Triton kernel for sm_90 (H100 / H200) with no GPU present.

Checks what can be checked without a GPU: each attention kernel compiles for ``GPUTarget("cuda", 90, 32)`` in bf16
(the paper's dtype) with its first Hopper config per head-dim class and the fixed one the GPU tests run, its matrix
products run on the tensor cores (``wgmma`` or ``mma`` in the PTX) and ptxas reports no register spills; in fp32
(IEEE dots: FMAs, no tensor cores) it compiles spill-free with its first fp32 config, and compiles with the fixed
one; the schedule, preprocess and patch (gather, scatter and its error pass, loss) kernels compile spill-free too.
The compile runs in a subprocess without ``TRITON_INTERPRET`` (conftest sets it for this process, and interpreted
kernels cannot be compiled). ``python tests/test_triton_sm90.py [--all] [--check]`` prints the table (``--all``: every attention
config of every set; ``--check``: exit 1 on a failed compile, a product off the tensor cores or a spill).
``make check-triton`` runs that with each triton release the kernels support.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

DOT_KERNELS = ("fwd", "dkdv", "dq", "fused")


_FP32 = ("Lse", "Delta", "dQacc", "SS", "NS", "W_", "Partial", "GradOut")


def _signature(fn, consts: dict, dtype: str = "bf16"):
    """Triton signature dict for ``fn``: ``dtype`` tensors, fp32 statistics and scales, int32 layout, unit head-dim
    strides as constants (Triton specialises a 1 the same way at launch), 16-divisible pointers and row strides."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ("*i32" if name in ("cu_ptr", "sched_ptr", "ids_ptr")
                         else "*fp32" if name.startswith(_FP32) else f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_all(every_config: bool = False) -> list[dict]:
    """Compile each dot kernel (and the schedule, preprocess and patch kernels) for sm_90; one row per compile, in
    job order. The compiles run in a process pool, one worker per CPU (forked: each rebuilds the same job list)."""
    import concurrent.futures
    import multiprocessing

    n = len(_jobs(every_config))
    workers = min(n, os.cpu_count() or 1)
    if workers == 1:
        return [_compile(i, every_config) for i in range(n)]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile, range(n), [every_config] * n))


@functools.cache
def _jobs(every_config: bool) -> list[tuple]:
    """(name, kernel, head_dim, config, uniform flag or the constants of a kernel without products, dtype, whether
    the config is the fixed GPU-test one)."""
    import triton

    from maskdm_kernels.ops import varlen_attention_triton as vat

    fixed = vat.GPU_FIXED_CONFIG  # what the GPU tests run (MASKDM_TRITON_AUTOTUNE=0)
    fixed = triton.Config({k: fixed[k] for k in ("BLOCK_M", "BLOCK_N")}, num_warps=fixed["num_warps"],
                          num_stages=fixed["num_stages"])
    jobs = []
    for dtype, sets in (("bf16", vat.CONFIGS), ("fp32", vat.CONFIGS_FP32)):
        for name in DOT_KERNELS:
            for head_dim, configs in sets[name].items():
                for cfg in (configs if every_config else configs[:1]) + [fixed]:
                    for uniform in (False, True):
                        jobs.append((name, vat._KERNELS[name], head_dim, cfg, uniform, dtype, cfg is fixed))
    plain = triton.Config({}, num_warps=4, num_stages=1)
    jobs += [("schedule", vat._schedule_kernel, 0, plain, {"BLOCK_B": b}, "bf16", False) for b in (16, 4096)]
    jobs.append(("preprocess", vat._bwd_preprocess_kernel, 64, plain, {"HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_T": 64},
                 "bf16", False))
    return jobs + _patch_jobs()


def _compile(i: int, every_config: bool) -> dict:
    """Job ``i`` of ``_jobs(every_config)`` compiled for sm_90 and run through ptxas -v: its row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, fn, head_dim, cfg, uniform, dtype, fixed = _jobs(every_config)[i]
    consts = {n: 1 for n in fn.arg_names if n.startswith("stride") and n.endswith("d")}
    if isinstance(uniform, dict):  # a kernel without products: its constants as given
        consts.update({k: v for k, v in uniform.items() if k in fn.arg_names})
    else:
        consts.update(HEAD_DIM=head_dim, BLOCK_D=head_dim, UNIFORM=uniform, EVEN=False, **cfg.kwargs)
    sig, attrs = _signature(fn, consts, dtype)
    row = {"kernel": name, "dtype": dtype, "head_dim": head_dim, "uniform": uniform, "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, **cfg.kwargs, "fixed": fixed}
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as e:  # noqa: BLE001  (reported per kernel, the test fails on it)
        return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    ptx = k.asm["ptx"]
    row.update(wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
               shared=getattr(k.metadata, "shared", None))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                           check=False, capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr)]
    regs = re.findall(r"Used (\d+) registers", r.stderr)
    row.update(ptxas_rc=r.returncode, spill_bytes=sum(spills) if spills else None,
               registers=int(regs[0]) if regs else None)
    return row


def _patch_jobs() -> list:
    """The patch kernels (no products) with the launch geometry uvit-b 256x256 p=4 gets (48 pixels per token), with
    every optional input on and off, a batch of 32 and the largest sample-search block."""
    import triton

    from maskdm_kernels.ops import patches_triton as pt

    block_t, block_j, warps = pt._launch_geometry(4 * 4 * 3)
    cfg = triton.Config({}, num_warps=warps, num_stages=3)
    unit = {"stride_xw": 1, "stride_nw": 1, "stride_ow": 1, "stride_tj": 1, "stride_pj": 1}  # contiguous
    geometry = [{"BLOCK_T": block_t, "BLOCK_J": block_j, "BLOCK_B": pt._block_b(b), **unit} for b in (32, 10**6)]
    jobs = []
    for g in geometry:
        for on in (False, True):
            jobs.append(("gather", pt._gather_kernel, 0, cfg, {**g, "HAS_NOISE": on, "HAS_SS": on, "HAS_NS": on},
                         "bf16", False))
            jobs += [("loss", pt._loss_kernel, 0, cfg, {**g, "HAS_WEIGHT": on, "BACKWARD": bwd}, "bf16", False)
                     for bwd in (0, 1)]
        jobs += [("scatter", pt._scatter_kernel, 0, cfg, g, "bf16", False),
                 ("scatter_poison", pt._scatter_poison_kernel, 0, cfg, g, "bf16", False)]
    return jobs


def _ptxas() -> str:
    """The ptxas triton itself runs for sm_90 (triton 3.9 emits PTX 9.x, which only its ``ptxas-blackwell`` takes)."""
    from triton.backends.nvidia import compiler

    return compiler.get_ptxas(90).path


def problems(rows: list[dict]) -> list[str]:
    """What is wrong with the compiled kernels: a failed compile or ptxas, a bf16 product off the tensor cores, a
    spill. Spills pass in fp32 with the fixed config (the GPU tests run it: it must compile, speed is not the point)
    and fp32 dQ with triton >= 3.9 (it spills at every tile: see ``CONFIGS_FP32``)."""
    import triton

    fp32_dq_spills = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)
    out = []
    for row in rows:
        what = f"{row['kernel']} {row['dtype']} Dh {row['head_dim']} uniform={row['uniform']} {row}"
        if "error" in row:
            out.append(f"{what}: {row['error']}")
        elif row["ptxas_rc"] != 0:
            out.append(f"{what}: ptxas failed")
        elif row["kernel"] in DOT_KERNELS and row["dtype"] == "bf16" and row["wgmma"] + row["mma"] == 0:
            out.append(f"{what}: no tensor-core instruction in the PTX")
        elif row["spill_bytes"] != 0 and not (row["dtype"] == "fp32" and (
                row["fixed"] or (fp32_dq_spills and row["kernel"] == "dq"))):
            out.append(f"{what}: ptxas reports {row['spill_bytes']} bytes of spills")
    return out


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
    try:
        if not os.path.exists(_ptxas()):
            return "this triton ships no ptxas"
    except Exception as e:  # noqa: BLE001
        return f"this triton does not say which ptxas it runs ({type(e).__name__}: {e})"
    return None


@pytest.mark.skipif(_api_missing() is not None, reason=str(_api_missing()))
def test_sm90_tensor_cores_no_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--json"], check=False, capture_output=True,
                       text=True, env=env, cwd=root, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    # (bf16, fp32) x (first config, fixed) x (Dh 64, 128) x uniform; schedule x 2, preprocess; patch kernels x 16
    assert len(rows) == 2 * 2 * 2 * 2 * len(DOT_KERNELS) + 3 + 16
    assert not problems(rows), "\n".join(problems(rows))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = compile_all(every_config="--all" in sys.argv)
    if "--json" in sys.argv:
        print(json.dumps(out))
    else:
        for row in out:
            print(row)
    if "--check" in sys.argv and problems(out):
        import triton

        sys.exit(f"triton {triton.__version__}, sm_90:\n" + "\n".join(problems(out)))
