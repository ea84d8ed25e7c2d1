"""Turn pytest-benchmark JSONs (and the rows streamed as they ran) into benchmarks/results/<date>-<gpu>.json + .md.

Also the device's ceilings: ``python benchmarks/summarize.py --ceilings OUT.json`` measures the copy bandwidth and
the matmul rate (bf16 on CUDA; fp32 on CPU) and writes them at once, so a cut-off suite keeps them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

JSONL_ENV = "MASKDM_BENCH_JSONL"


def append_jsonl(row: dict, path: str | None = None) -> None:
    """Append one result row to ``path`` (default ``$MASKDM_BENCH_JSONL``; nothing when unset), flushed at once so
    a run cut off by a time limit still leaves every finished row."""
    path = path or os.environ.get(JSONL_ENV)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def load_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file; a line cut off mid-write is dropped."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def matmul_tflops(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seconds: float = 0.5) -> float:
    """Dense matmul rate in TFLOP/s (``2 n^3`` per product): n = 8192 on CUDA, 1024 on CPU; median over about
    ``seconds`` of repeats. The peak a model's MFU is measured against in the same run. On CUDA each repeat is a
    burst of products between two events: device time only, so a busy host (the suite builds beside it) cannot
    lower the rate."""
    n, burst = (8192, 10) if device == "cuda" else (1024, 1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        if device == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(burst):
                a @ b
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3 / burst)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def copy_bandwidth_gbs(nbytes: int = 1 << 30, iters: int = 20) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / time), median of ``iters`` copies."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times = sorted(times[3:])
    return round(2 * nbytes / times[len(times) // 2] / 1e9, 1)


def ceilings() -> dict:
    """Copy bandwidth (CUDA only) and the matmul rate of this machine."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    return {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
            "copy_bandwidth_GBps": copy_bandwidth_gbs(),
            "matmul_tflops": round(matmul_tflops(dev, dtype), 3), "matmul_dtype": str(dtype).split(".")[-1]}


def facts() -> dict:
    f = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        f["triton"] = triton.__version__
    except ImportError:
        f["triton"] = None
    f["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    try:
        f["commit"] = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                     text=True, check=False).stdout.strip() or None
    except OSError:
        f["commit"] = None
    f["copy_bandwidth_GBps"] = copy_bandwidth_gbs()
    return f


def facts_from_info(text: str) -> dict:
    """The device's facts as ``python -m maskdm_kernels.info`` printed them there (for summaries made elsewhere)."""
    top = {}
    for line in text.splitlines():
        if line.startswith("build:"):
            break
        key, _, val = line.strip().partition(": ")
        if val:
            top[key] = val.strip()
    return {"date": datetime.date.today().isoformat(), "torch": top.get("torch"), "cuda": top.get("torch_cuda"),
            "triton": top.get("triton"), "device": top.get("gpu", "cpu"), "commit": None, "copy_bandwidth_GBps": None}


def load_benchmarks(spec: str) -> list:
    """``path`` or ``path=label`` (the label is appended to each group); an empty or cut-off file gives nothing."""
    path, _, label = spec.partition("=")
    try:
        benches = json.loads(Path(path).read_text())["benchmarks"]
    except (OSError, ValueError, KeyError) as e:
        print(f"skipping {path}: {type(e).__name__}")
        return []
    for b in benches:
        if label:
            b["group"] = f"{b.get('group') or b['name'].split('[')[0]} ({label})"
    return benches


def test_counts(path: str | None) -> dict | None:
    if not path or not Path(path).exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", nargs="*", default=[],
                    help="pytest-benchmark JSON files, each PATH or PATH=LABEL (missing or cut-off ones skipped)")
    ap.add_argument("--rows", nargs="*", default=[],
                    help="JSONL files of rows streamed while benchmarks ran (benchmarks/conftest.py; kept when a run "
                         "was cut off)")
    ap.add_argument("--ceilings", help="measure the copy bandwidth and matmul rate, write them to this JSON, exit")
    ap.add_argument("--ceilings-json", help="ceilings measured earlier (--ceilings) to put in the summary")
    ap.add_argument("--tests")
    ap.add_argument("--info")
    ap.add_argument("--outdir", default="benchmarks/results")
    ap.add_argument("--from-info", action="store_true",
                    help="take device, torch, triton and CUDA from --info (summarising elsewhere than the device)")
    ap.add_argument("--commit", help="the commit the device ran (default: this checkout's HEAD)")
    ap.add_argument("--note", action="append", default=[], help="a line for the summary's notes (repeatable)")
    args = ap.parse_args()
    if args.ceilings:
        c = ceilings()
        Path(args.ceilings).write_text(json.dumps(c, indent=1))
        print(f"ceilings: {c}")
        return
    meta = facts_from_info(Path(args.info).read_text()) if args.from_info else facts()
    if args.commit:
        meta["commit"] = args.commit
    if args.ceilings_json and Path(args.ceilings_json).is_file():
        c = json.loads(Path(args.ceilings_json).read_text())
        meta["copy_bandwidth_GBps"] = c.get("copy_bandwidth_GBps") or meta.get("copy_bandwidth_GBps")
        meta["matmul_tflops"] = c.get("matmul_tflops")
    streamed = [r for path in args.rows for r in load_jsonl(path)]
    seen = {(r.get("file"), r.get("name")) for r in streamed}
    rows = list(streamed)
    for spec in args.bench:  # pytest-benchmark's JSONs: the rows not already streamed
        for b in load_benchmarks(spec):
            file = Path(b.get("fullname", "").split("::")[0]).name
            if (file, b["name"]) in seen:
                continue
            rows.append({"group": b.get("group"), "name": b["name"], "file": file, "median_s": b["stats"]["median"],
                         "rounds": b["stats"]["rounds"], **b.get("extra_info", {})})
    for r in rows:  # on a GPU the CUDA-event median, where the benchmark recorded one
        if r.get("device_median_ms") is not None:
            r["median_s"] = r["device_median_ms"] / 1e3
    steps = [r for r in rows if r.get("mfu") is not None]
    rows = [r for r in rows if r.get("mfu") is None]
    out = {"meta": meta, "tests": test_counts(args.tests), "benchmarks": rows, "train_step": steps,
           "info": Path(args.info).read_text() if args.info and Path(args.info).exists() else None}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower()
    stem = Path(args.outdir) / f"{meta['date']}-{slug}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    md = [f"# GPU suite: {meta['device']}, {meta['date']}", ""]
    md += [f"- {k}: {v}" for k, v in meta.items()]
    if out["tests"]:
        md.append(f"- GPU tests: {out['tests']}")
    md += [f"- note: {n}" for n in args.note]
    md += op_table(rows) + step_table(steps)
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(step_table(steps)))
    print(f"wrote {stem}.json and {stem}.md")


def op_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    md = ["", "Times: CUDA-event medians (`device_median_ms`) where recorded, else pytest-benchmark's median.", "",
          ("Graph: the same call replayed from a CUDA graph (kernels only, no host overhead), where it could be "
           "captured."), "",
          "| group | benchmark | median | graph | GB/s | TFLOP/s | img/s | vs full |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["group"] or "", r["median_s"])):
        gm = r.get("graph_median_ms")
        md.append(f"| {r['group']} | {r['name']} | {r['median_s'] * 1e3:.3f} ms | "
                  f"{'' if gm is None else f'{gm:.3f} ms'} | {r.get('GB/s', '')} "
                  f"| {r.get('TFLOP/s', '')} | {r.get('images_per_s', '')} | {r.get('speedup_vs_full', '')} |")
    return md


def step_table(steps: list[dict]) -> list[str]:
    """The train-step rows, with each masked provider's ratio to ``maskdm`` at the same batch and mask ratio."""
    if not steps:
        return []
    ours = {(r["batch"], str(r["mask_ratio"])): r["images_per_s"] for r in steps if r["provider"] == "maskdm"}
    full = {(r["batch"], r.get("compile")): r["images_per_s"] for r in steps if r["provider"] in ("full", "full_eager")}
    s0 = steps[0]
    head = (f"Train step ({s0.get('case', '')}, {s0.get('device', '')}): images/s, host time to enqueue one step, "
            f"MFU against the {s0.get('matmul_dtype', '')} matmul rate measured in the run "
            f"({s0.get('matmul_tflops', '')} TFLOP/s).")
    md = ["", head, "",
          "| batch | mask ratio | provider | compile | img/s | host ms | MFU | vs full | maskdm / this |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(steps, key=lambda r: (r["batch"], str(r["mask_ratio"]), -r["images_per_s"])):
        o = ours.get((r["batch"], str(r["mask_ratio"])))
        rel = f"{o / r['images_per_s']:.2f}x" if o and r["provider"] != "maskdm" else ""
        f = full.get((r["batch"], r.get("compile")))  # the full step of the same compile mode, from any run
        vs_full = f"{r['images_per_s'] / f:.2f}x (FLOPs {r.get('flop_ratio_vs_full', '')}x)" \
            if f and not r["provider"].startswith("full") else ""
        md.append(f"| {r['batch']} | {r['mask_ratio']} | {r['provider']} | {r.get('compile', '')} | "
                  f"{r['images_per_s']} | {r.get('host_ms', '')} | {r.get('mfu', '')} | "
                  f"{vs_full} | {rel} |")
    return md


if __name__ == "__main__":
    main()
