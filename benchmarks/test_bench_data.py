"""Data at scale: peak memory of the folder decode, and loader images/s per worker from the decoded memory map.

- ``test_folder_decode_peak_memory``: decodes a synthetic folder (``MASKDM_BENCH_DECODE_N`` images, default 4,000,
  half JPEG half PNG, decoded to 128 px: a 197 MB array) in a fresh subprocess and reports the growth of its peak
  RSS (``VmHWM``, reset just before the decode) over its RSS before the decode, and the same for each decode worker
  (its peak over its RSS before its first chunk). Target (issue 14): at most 120 MB.
- ``test_loader_images_per_worker``: ``DataLoader`` workers (``MASKDM_BENCH_LOADER_WORKERS``, default 1) read
  shuffled batches of 64 uint8 images at 256 px from a ``.npy`` memory map (warm page cache), pinned on CUDA;
  reports images/s per worker and, beside it, the rate the masked training step needs: the newest committed
  GPU result in ``benchmarks/results/`` (uvit-b, block-4 90%), and whether 16 cores (per-worker rate x 16)
  give 2x that.

    pytest benchmarks/test_bench_data.py --benchmark-only -s
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdm import data as D

RESULTS = Path(__file__).parent / "results"


def synth_folder(root: Path, n: int, size: tuple[int, int] = (160, 144), seed: int = 0) -> Path:
    """``n`` RGB images (smooth gradients + noise, so JPEG sizes are realistic), alternating .jpg / .png."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        c = rng.uniform(0, 255, size=(3, 3))
        img = np.stack([c[k, 0] * xx / w + c[k, 1] * yy / h + c[k, 2] * 0.3 for k in range(3)], -1)
        img = np.clip(img + rng.normal(0, 12, size=img.shape), 0, 255).astype(np.uint8)
        sub = root / f"{i % 7:02d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:06d}.{'jpg' if i % 2 else 'png'}", quality=90)
    return root


_MEASURE = textwrap.dedent("""
    import json, os, sys
    import maskdm.data as D

    def status_kb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    def reset_peak():  # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    root, cache, size, workers, logdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    orig, base = D._decode_chunk, {}

    def _decode_chunk(*args):  # in each forked worker: its peak RSS over its RSS before its first chunk
        pid = os.getpid()
        if pid not in base:
            reset_peak()
            base[pid] = status_kb("VmRSS")
        n = orig(*args)
        with open(os.path.join(logdir, str(pid)), "w") as f:
            f.write(str(status_kb("VmHWM") - base[pid]))
        return n

    _decode_chunk.__module__, _decode_chunk.__qualname__ = "maskdm.data", "_decode_chunk"
    D._decode_chunk = _decode_chunk
    D._image_files(D.Path(root))  # PIL's plugins imported before the baseline
    reset_peak()
    base_rss = status_kb("VmRSS")
    arr = D.load_image_folder(root, size, 3, cache_dir=cache, workers=workers)
    main = status_kb("VmHWM") - base_rss
    workers_kb = [int(open(os.path.join(logdir, p)).read()) for p in os.listdir(logdir)]
    print(json.dumps({"shape": list(arr.shape), "array_mb": arr.nbytes / 2**20, "main_growth_mb": main / 1024,
                      "worker_growth_mb": max(workers_kb) / 1024, "processes": len(workers_kb),
                      "base_rss_mb": base_rss / 1024}))
""")


def test_folder_decode_peak_memory(benchmark, tmp_path_factory):
    n = int(os.environ.get("MASKDM_BENCH_DECODE_N", "4000"))
    workers = int(os.environ.get("MASKDM_BENCH_DECODE_WORKERS", "2"))
    root = synth_folder(tmp_path_factory.mktemp("folder") / "imgs", n)
    cache = tmp_path_factory.mktemp("cache")
    logdir = tmp_path_factory.mktemp("rss")
    out = {}

    def run():
        for f in cache.glob("*.npy"):
            f.unlink()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(root), str(cache), "128", str(workers), str(logdir)],
                           capture_output=True, text=True, check=True)
        out.update(json.loads(r.stdout.strip().splitlines()[-1]), seconds=time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=1, iterations=1)
    out["images_per_s"] = n / out["seconds"]
    benchmark.extra_info.update(out, images=n, workers=workers)
    print(f"\n[decode] {n} images -> {out['shape']} ({out['array_mb']:.0f} MB) with {workers} worker(s) in "
          f"{out['seconds']:.1f}s: peak RSS growth main {out['main_growth_mb']:.1f} MB, largest worker "
          f"{out['worker_growth_mb']:.1f} MB (target <= 120 MB)")
    assert out["main_growth_mb"] <= 120 and out["worker_growth_mb"] <= 120


def masked_step_need() -> tuple[float, str]:
    """images/s of the masked training step (uvit-b, 90% block mask, ours) in the newest GPU result JSON: the
    highest rate among the rows of that file's latest run, so the loader is sized for the most demanding one."""
    files = sorted(glob.glob(str(RESULTS / "*.json")))
    if not files:
        pytest.skip(f"no GPU results in {RESULTS}")
    rows = json.loads(Path(files[-1]).read_text())["benchmarks"]
    rows = [r for r in rows if r.get("name", "").startswith("test_masked_step[")
            and r.get("provider") in ("maskdm", "maskdm_kernels") and r.get("mask_ratio") == 0.9
            and "images_per_s" in r]
    if not rows:
        pytest.skip(f"{files[-1]} has no masked-step row at mask ratio 0.9")

    def run_no(r):
        m = re.search(r"\(run (\d+)", r.get("group", ""))
        return int(m.group(1)) if m else 0

    latest = max(map(run_no, rows))
    best = max((r for r in rows if run_no(r) == latest), key=lambda r: r["images_per_s"])
    return float(best["images_per_s"]), f"{Path(files[-1]).name}: {best['name']}, {best.get('case', '')}"


def test_loader_images_per_worker(benchmark, tmp_path):
    n, size, batch = int(os.environ.get("MASKDM_BENCH_LOADER_N", "512")), 256, 64
    workers = int(os.environ.get("MASKDM_BENCH_LOADER_WORKERS", "1"))
    path = tmp_path / "images.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    arr[:] = np.random.default_rng(0).integers(0, 256, size=arr.shape, dtype=np.uint8)
    arr.flush()
    del arr
    ds = D.ImageTensorDataset(np.load(path, mmap_mode="r"), "bench")
    plan = D.BatchPlan(n, batch, seed=0)
    loader = D.make_loader(ds, plan, num_workers=workers, pin_memory=torch.cuda.is_available())
    list(loader)  # start the workers, warm the page cache

    def epoch():
        plan.set_position(1, 0)
        return sum(b.shape[0] for b in loader)

    count = []
    benchmark.pedantic(lambda: count.append(epoch()), rounds=3, iterations=1)
    per_worker = count[-1] / benchmark.stats.stats.median / max(workers, 1)
    need, source = masked_step_need()
    cores16 = per_worker * 16
    benchmark.extra_info.update(images_per_s_per_worker=round(per_worker, 1), masked_step_images_per_s=need,
                                need_source=source, images_per_s_16_workers=round(cores16, 1),
                                meets_2x_need=cores16 >= 2 * need)
    print(f"\n[loader] {per_worker:.0f} img/s per worker (256 px uint8, batch {batch}, {workers} worker(s)); the "
          f"masked step needs {need:.0f} img/s ({source}); 16 workers: {cores16:.0f} img/s vs 2x need "
          f"{2 * need:.0f}: {'OK' if cores16 >= 2 * need else 'SHORT'}")
