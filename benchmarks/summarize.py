"""Turn a pytest-benchmark JSON into benchmarks/results/<date>-<gpu>.json + .md with the device's facts."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import torch


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
    ap.add_argument("--bench", required=True, nargs="+",
                    help="pytest-benchmark JSON files, each PATH or PATH=LABEL (missing or cut-off ones skipped)")
    ap.add_argument("--tests")
    ap.add_argument("--info")
    ap.add_argument("--outdir", default="benchmarks/results")
    ap.add_argument("--from-info", action="store_true",
                    help="take device, torch, triton and CUDA from --info (summarising elsewhere than the device)")
    ap.add_argument("--commit", help="the commit the device ran (default: this checkout's HEAD)")
    ap.add_argument("--note", action="append", default=[], help="a line for the summary's notes (repeatable)")
    args = ap.parse_args()
    meta = facts_from_info(Path(args.info).read_text()) if args.from_info else facts()
    if args.commit:
        meta["commit"] = args.commit
    benches = [b for spec in args.bench for b in load_benchmarks(spec)]
    rows = []
    for b in benches:
        dev = b.get("extra_info", {}).get("device_median_ms")
        rows.append({"group": b.get("group"), "name": b["name"],
                     "median_s": dev / 1e3 if dev is not None else b["stats"]["median"],
                     "rounds": b["stats"]["rounds"], **b.get("extra_info", {})})
    out = {"meta": meta, "tests": test_counts(args.tests), "benchmarks": rows,
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
    md += ["", "Times: CUDA-event medians (`device_median_ms`) where recorded, else pytest-benchmark's median.", "",
           ("Graph: the same call replayed from a CUDA graph (kernels only, no host overhead), where it could be "
            "captured."), "",
           "| group | benchmark | median | graph | GB/s | TFLOP/s | img/s | vs full |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["group"] or "", r["median_s"])):
        gm = r.get("graph_median_ms")
        md.append(f"| {r['group']} | {r['name']} | {r['median_s'] * 1e3:.3f} ms | "
                  f"{'' if gm is None else f'{gm:.3f} ms'} | {r.get('GB/s', '')} "
                  f"| {r.get('TFLOP/s', '')} | {r.get('images_per_s', '')} | {r.get('speedup_vs_full', '')} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
