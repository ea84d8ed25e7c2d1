"""One optimizer step of MaskedViT (loss, backward, grad clip, AdamW, EMA), in images/s, against its peers.

Providers (every one ends with the same tail: ``clip_grad_norm_`` (foreach), AdamW (fused on CUDA; on CPU
PyTorch's default, the foreach implementation, since fused CPU AdamW is not what ``maskdm train`` runs there)
and a one-op foreach EMA update):
  maskdm               our step exactly as ``maskdm train`` runs it on this device (``maskdm.step.TrainStep`` with
                       ``train.compile=auto``: reduce-overhead on CUDA, off on CPU; varlen masks on a static-capacity
                       layout whenever it compiles);
  maskdm_eager         the same step with ``train.compile=off``;
  maskdm_graph         (CUDA) the same step with ``train.cuda_graph=true``: compile ``default`` and the whole step
                       (loss, backward, clip, AdamW, EMA) captured by ``torch.cuda.graph`` and replayed;
  torch_best           best-effort PyTorch, eager: ``torch.gather`` of the visible patches, noising on them only,
                       SDPA, ``F.mse_loss`` (varlen: padded gather, SDPA with a key-padding mask, masked mean);
  torch_best_compiled  the same, ``torch.compile``d with the mode ``maskdm`` uses;
  maskdm_style         the MaskDM recipe: noised full image, patchify, boolean-mask indexing (a host sync),
                       attention that materialises the score matrix, unfused loss (uniform masks only: it reshapes
                       the indexed tokens to ``(B, -1, D)``);
  full / full_eager    the full-image DDPM step through ``TrainStep`` (same compile mode as ``maskdm`` / off).
Where the mode resolves to ``off`` (CPU by default) ``maskdm_eager``, ``full`` and ``torch_best_compiled`` skip: they
would repeat ``maskdm``, ``full_eager`` and ``torch_best``.

Cases: mask ratios 0.5 / 0.75 / 0.9 (block-4 masks) and ``varlen`` (a per-sample ratio in [0.75, 0.95]).
GPU: ``uvit-b`` 256x256, p=4, bf16 autocast, batches 32 and 128. CPU: ``uvit-tiny`` 32x32, p=2, fp32, batch 64, and
by default only ratio 0.9 and varlen (``MASKDM_BENCH_RATIOS=0.5,0.75,0.9,varlen`` for all). Other knobs:
``MASKDM_BENCH_BATCHES=32,128``, ``MASKDM_BENCH_COMPILE=default`` (the mode ``maskdm`` / ``full`` /
``torch_best_compiled`` use instead of ``auto``'s), ``MASKDM_BENCH_PROVIDERS=maskdm,full``.

Each row's ``extra_info``: provider, batch, mask_ratio, images_per_s, ``mfu`` (model matmul FLOPs of the step,
counted on the real tokens only, per second, over the matmul rate measured at the start of this run: bf16 on CUDA,
fp32 on CPU, in ``matmul_tflops``), ``host_ms`` (host time to enqueue one step, measured with the device idle
before the call; on CPU the host does the work too, so it is the step time), ``warmup_s`` (first calls, compile
included), ``graph_breaks`` (compiled rows: Dynamo graph breaks met while timing; should be 0), the speed-up over
the full step of the same compile mode and the FLOP ratio beside it. Before timing,
each peer's loss is checked against ours on the same weights and inputs, so a provider that skipped work fails.

    pytest benchmarks/test_bench_train_step.py --benchmark-only

NOTE: CPU, this project's 2-core box shared with other jobs (load ~7-10), one thread, 2026-11-30, B=64: at 87.5%
maskdm 50.8 img/s, full 5.7 (8.9x, FLOP ratio 9.8x), torch_best 49.6, maskdm_style 35.6; varlen [0.75, 0.95]
maskdm 23.8, torch_best 19.7. A second run with MASKDM_BENCH_COMPILE=default: maskdm 49.4 (176 s compile
warm-up), maskdm_eager 53.2, torch_best 62.7, torch_best_compiled 52.7: run-to-run noise of up to 26% on this
box. GPU: unmeasured since these providers were added (README).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from maskdm import GaussianDiffusion, create_model, masking
from maskdm.ema import EMA
from maskdm.model import timestep_embedding
from maskdm.step import CAPACITY_SLACK, Denoiser, TrainStep, graph_break_count, resolve_compile

from .summarize import matmul_tflops

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
CASE = ({"model": "uvit-b", "img": 256, "patch": 4, "dtype": torch.bfloat16, "steps": 5, "rounds": 5, "warmup": 3}
        if ON_GPU else
        {"model": "uvit-tiny", "img": 32, "patch": 2, "dtype": None, "steps": 1, "rounds": 3, "warmup": 2})
VARLEN = (0.75, 0.95)
BLOCK, CLIP, EMA_DECAY = 4, 1.0, 0.9999


def _env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    return [s.strip() for s in raw.split(",") if s.strip()] if raw else default


BATCHES = [int(b) for b in _env_list("MASKDM_BENCH_BATCHES", ["32", "128"] if ON_GPU else ["64"])]
RATIOS = _env_list("MASKDM_BENCH_RATIOS", ["0.5", "0.75", "0.9", "varlen"] if ON_GPU else ["0.9", "varlen"])
MODE = resolve_compile(os.environ.get("MASKDM_BENCH_COMPILE", "auto"), torch.device(DEVICE))
MASKED = ["maskdm", "maskdm_eager", "maskdm_graph", "torch_best", "torch_best_compiled", "maskdm_style"]
PROVIDERS = _env_list("MASKDM_BENCH_PROVIDERS", ["full", "full_eager", *MASKED])
COMPILED = {"maskdm", "full", "torch_best_compiled"}  # providers that run in MODE

_FULL_SECONDS: dict[tuple[int, bool], float] = {}
_ROWS: list[str] = []
_RATE: dict[str, float] = {}


def _params():
    """Per batch: the eager rows first (seconds each), then the compiled ones (each compiles from scratch), ours and
    its full step before the peers, so a run cut off by a time limit keeps the most telling rows."""
    out = []
    for b in BATCHES:
        out += [(b, "0", "full_eager")] + [(b, r, p) for r in RATIOS for p in ("maskdm_eager", "torch_best",
                                                                                "maskdm_style")]
        out += [(b, r, "maskdm") for r in RATIOS] + [(b, "0", "full")]
        out += [(b, r, p) for r in RATIOS for p in ("torch_best_compiled", "maskdm_graph")]
    return [pytest.param(*x, id=f"{DEVICE}-B{x[0]}-{x[2]}-{x[1]}") for x in out if x[2] in PROVIDERS]


# ------------------------------------------------------------------------------------------------- peers
def _run_blocks(model, h, attn):
    """U-ViT blocks on a uniform ``(B, L, D)`` batch with ``attn(q, k, v)`` over ``(B, H, L, Dh)``."""
    def block(blk, x, skip=None):
        if blk.skip_linear is not None:
            x = blk.skip_linear(torch.cat([x, skip], dim=-1))
        B, L, D = x.shape
        a = blk.attn
        q, k, v = a.qkv(blk.norm1(x)).view(B, L, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        x = x + a.proj(attn(q, k, v).transpose(1, 2).reshape(B, L, D))
        return x + blk.mlp(blk.norm2(x))

    skips = []
    for blk in model.in_blocks:
        h = block(blk, h)
        skips.append(h)
    h = block(model.mid_block, h)
    for blk in model.out_blocks:
        h = block(blk, h, skips.pop())
    return h


def _extras(model, t, dtype):
    te = model.time_embed(timestep_embedding(t, model.embed_dim)).to(dtype)
    return (te[:, None] + model.pos_embed[:, :1]).to(dtype)  # (B, 1, D)


def _explicit_attention(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, L, L) materialised
    return scores.softmax(dim=-1) @ v


def maskdm_style_loss(model, diffusion, x0, t, noise, mask):
    """MaskDM's recipe: noise the full image, patchify everything, drop masked tokens by boolean indexing."""
    p, B = model.patch_size, x0.shape[0]
    xt = diffusion.q_sample(x0, t, noise)
    tokens = model.patch_embed(rearrange(xt, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p))
    tokens = tokens + model.pos_embed[:, 1:]
    tokens = tokens[~mask].reshape(B, -1, model.embed_dim)  # host sync: data-dependent shape
    h = torch.cat([_extras(model, t, tokens.dtype), tokens], dim=1)
    h = _run_blocks(model, h, _explicit_attention)
    pred = model.head(model.norm(h[:, 1:]))
    target = rearrange(noise, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)[~mask]
    target = target.reshape(B, -1, pred.shape[-1])
    return ((pred.float() - target.float()) ** 2).mean()


def torch_best_loss(model, diffusion, x0, t, noise, idx, keep=None):
    """Plain PyTorch at its best: gather the visible patches (``idx (B, L)``), noise only them, SDPA, MSE.
    ``keep (B, L)`` bool marks real entries of a padded (varlen) ``idx``; None: uniform."""
    p, (B, L), P = model.patch_size, idx.shape, model.patch_dim

    def take(img):
        return torch.gather(rearrange(img, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p), 1,
                            idx[..., None].expand(B, L, P))

    a = diffusion._at("sqrt_alphas_cumprod", t).view(B, 1, 1)
    s = diffusion._at("sqrt_one_minus_alphas_cumprod", t).view(B, 1, 1)
    target = take(noise)
    tokens = model.patch_embed((a * take(x0) + s * target).to(x0.dtype)) + model.pos_embed[0, 1:][idx]
    h = torch.cat([_extras(model, t, tokens.dtype), tokens], dim=1)
    if keep is None:
        h = _run_blocks(model, h, F.scaled_dot_product_attention)
    else:
        km = F.pad(keep, (1, 0), value=True)[:, None, None, :]  # (B, 1, 1, 1 + L): the time token and real keys
        h = _run_blocks(model, h, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=km))
    pred = model.head(model.norm(h[:, 1:]))
    if keep is None:
        return F.mse_loss(pred.float(), target.float())
    per = (pred.float() - target.float()).square().mean(-1) * keep  # (B, L)
    return (per.sum(1) / keep.sum(1)).mean()


def _tail(model, opt, ema, decay):
    """What follows the backward in every peer, as in ``TrainStep``: clip, AdamW, EMA (one foreach op)."""
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.update(decay)


# ----------------------------------------------------------------------------------------------------- FLOPs
def sample_flops(model, tokens: int) -> float:
    """Matmul FLOPs of forward + backward (3x forward) for one sample with ``tokens`` visible patches."""
    D, P, L = model.embed_dim, model.patch_dim, tokens + model.extras
    hidden = model.mid_block.mlp.fc1.out_features
    depth = 2 * len(model.in_blocks) + 1
    per_block = 2 * L * (4 * D * D + 2 * D * hidden) + 4 * L * L * D  # qkv + proj + mlp, then QK^T and AV
    skips = len(model.out_blocks) * 2 * L * 2 * D * D
    return 3.0 * (depth * per_block + skips + 2 * tokens * P * D * 2)


# -------------------------------------------------------------------------------------------------- harness
def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _rate() -> float:
    """FLOP/s of a large matmul here, measured once per run (bf16 on CUDA, fp32 on CPU)."""
    if "rate" not in _RATE:
        _RATE["rate"] = matmul_tflops(DEVICE, torch.bfloat16 if ON_GPU else torch.float32) * 1e12
    return _RATE["rate"]


def _inputs(batch: int):
    torch.manual_seed(0)
    model = create_model(CASE["model"], img_size=CASE["img"], patch_size=CASE["patch"]).to(DEVICE).train()
    diffusion = GaussianDiffusion("cosine")
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 3, CASE["img"], CASE["img"], generator=g) * 2 - 1).to(DEVICE)
    noise = torch.randn(batch, 3, CASE["img"], CASE["img"], generator=g).to(DEVICE)
    t = torch.randint(0, 1000, (batch,), generator=g).to(DEVICE)
    return model, diffusion, x0, noise, t


def _autocast():
    if CASE["dtype"] is None:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE, dtype=CASE["dtype"])


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.99, 0.99), weight_decay=0.03,
                             fused=True if ON_GPU else None)


def _measure(benchmark, step, warmup_calls: int):
    """(seconds per step, host ms per enqueue, warm-up seconds). ``step()`` runs one step without syncing."""
    _sync()
    t0 = time.perf_counter()
    for _ in range(warmup_calls):
        step()
    _sync()
    warmup = time.perf_counter() - t0
    host = []
    for _ in range(3):  # enqueue time with an idle device (nothing queued ahead of the call)
        _sync()
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
    _sync()
    n, rounds = CASE["steps"], []

    def run():  # back-to-back steps as a training loop runs them, one sync at the end
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        _sync()
        rounds.append((time.perf_counter() - t0) / n)

    benchmark.pedantic(run, rounds=CASE["rounds"], warmup_rounds=0, iterations=1)
    return statistics.median(rounds), statistics.median(host) * 1e3, warmup


def _skip_if_too_big(provider, model, batch, L):
    if provider != "maskdm_style" or not ON_GPU:
        return
    # scores + probabilities of every block stay alive for the backward: (B, H, L, L) twice per block, bf16
    need = 2 * (2 * len(model.in_blocks) + 1) * batch * model.mid_block.attn.num_heads * L * L * 2
    have = torch.cuda.get_device_properties(0).total_memory
    if need > 0.7 * have:
        pytest.skip(f"MaskDM-style attention would keep {need / 2**30:.0f} GiB of score matrices "
                    f"(device has {have / 2**30:.0f} GiB)")


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if tr is None or not _ROWS:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        tr.write_line("")
        tr.write_line(f"train step ({CASE['model']} {CASE['img']}x{CASE['img']} p={CASE['patch']} on {_device()}, "
                      f"compile mode {MODE}): img/s | host ms | mfu | vs full (FLOP ratio)")
        for row in _ROWS:
            tr.write_line("  " + row)


def _device() -> str:
    return torch.cuda.get_device_name() if ON_GPU else f"CPU ({torch.get_num_threads()} threads)"


@pytest.mark.parametrize("batch,ratio,provider", _params())
def test_train_step(benchmark, batch, ratio, provider):
    if provider == "maskdm_graph" and not ON_GPU:
        pytest.skip("maskdm_graph captures the step with torch.cuda.graph: CUDA only")
    twin = {"maskdm_eager": "maskdm", "full": "full_eager", "torch_best_compiled": "torch_best"}.get(provider)
    if twin and MODE == "off":
        pytest.skip(f"compile mode resolves to 'off' on {DEVICE}: {provider} would repeat {twin} "
                    f"(MASKDM_BENCH_COMPILE=default to compile here)")
    if provider == "maskdm_style" and ratio == "varlen":
        pytest.skip("the MaskDM recipe reshapes boolean-indexed tokens to (B, -1, D): uniform masks only")
    torch._dynamo.reset()  # each provider compiles from scratch; no cache limit carried over from other cases
    model, diffusion, x0, noise, t = _inputs(batch)
    grid = model.grid_size
    g = torch.Generator().manual_seed(1)
    vis = None if ratio == "0" else masking.block_patches(
        batch, grid, VARLEN if ratio == "varlen" else float(ratio), block_size=BLOCK, generator=g, device=DEVICE)
    lengths = [model.num_patches] * batch if vis is None else vis.lengths.tolist()
    _skip_if_too_big(provider, model, batch, max(lengths) + 1)
    mode = MODE if provider in COMPILED else "default" if provider == "maskdm_graph" else "off"
    opt = _optimizer(model)
    ema = EMA(model)

    if provider in ("maskdm", "maskdm_eager", "maskdm_graph", "full", "full_eager"):
        graph = provider == "maskdm_graph"
        cap = None  # varlen: the static-capacity layout whenever shapes must stay fixed, as `maskdm train` does
        if ratio == "varlen" and (mode != "off" or graph):
            cap = masking.static_capacity(batch, grid, VARLEN, BLOCK, slack=None if graph else CAPACITY_SLACK)
        runner = TrainStep(model, Denoiser(model), diffusion, opt, ema, CLIP, CASE["dtype"] is not None,
                           compile=mode, capacity=cap, cuda_graph=graph)

        def step():
            runner(x0, t, noise, vis, 1e-4, EMA_DECAY)
    else:
        keep = torch.zeros(batch, model.num_patches, dtype=torch.bool, device=DEVICE)
        keep[vis.sample_index(), vis.ids.long()] = True
        if provider == "maskdm_style":
            args = (model, diffusion, x0, t, noise, ~keep)  # the mask is prepared outside (MaskDM's data loader)
            fn = maskdm_style_loss
        else:
            L = max(lengths)
            # kept ids to the front of each row (ascending), padded with patch 0: built outside the step
            ar = torch.arange(model.num_patches, device=DEVICE)
            idx = torch.where(keep, ar, ar + model.num_patches).sort(dim=1).values[:, :L]
            real = idx < model.num_patches
            idx = torch.where(real, idx, 0)
            args = (model, diffusion, x0, t, noise, idx, None if ratio != "varlen" else real)
            fn = torch_best_loss if mode == "off" else torch.compile(torch_best_loss, mode=mode, dynamic=False)
        with torch.no_grad(), _autocast():  # same weights, same inputs: same loss as our path
            ref = diffusion.loss(model, x0, vis, t=t, noise=noise).item()
            got = getattr(fn, "_torchdynamo_orig_callable", fn)(*args).item()  # eager: no extra inference compile
        # bf16 autocast: both sides round activations to bf16 (8 bits) in different places; fp32: summation order
        tol = 2e-2 if CASE["dtype"] is not None else 1e-4
        assert math.isclose(got, ref, rel_tol=tol), f"{provider} loss {got} != maskdm loss {ref}"

        def step():
            with _autocast():
                loss = fn(*args)
            loss.backward()
            _tail(model, opt, ema, EMA_DECAY)

    breaks = graph_break_count()
    try:
        # the captured step replays from its 4th call (3 eager warm-up steps, then the capture)
        seconds, host_ms, warmup = _measure(benchmark, step, CASE["warmup"] + 2 * (provider == "maskdm_graph"))
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        pytest.skip(f"out of GPU memory at batch {batch}: {str(e).splitlines()[0][:160]}")
    ips = batch / seconds
    flops = sum(sample_flops(model, n) for n in lengths)
    full_flops = batch * sample_flops(model, model.num_patches)
    compiled = mode != "off"
    if provider.startswith("full"):
        _FULL_SECONDS[(batch, compiled)] = seconds
    label = f"{VARLEN[0]}-{VARLEN[1]}" if ratio == "varlen" else float(ratio)
    info = {"provider": provider, "batch": batch, "mask_ratio": label,
            "images_per_s": round(ips, 2), "mfu": round(flops / seconds / _rate(), 4), "host_ms": round(host_ms, 3),
            "warmup_s": round(warmup, 2), "compile": mode, "matmul_tflops": round(_rate() / 1e12, 3),
            "matmul_dtype": "bf16" if ON_GPU else "fp32", "device": _device(),
            "case": f"{CASE['model']} {CASE['img']}x{CASE['img']} p={CASE['patch']}",
            "tokens_per_sample": round(sum(lengths) / batch, 1), "flop_ratio_vs_full": round(full_flops / flops, 2)}
    row = (f"B={batch} {provider:<20} ratio {info['mask_ratio']!s:<7} {ips:9.1f} img/s  host {host_ms:8.2f} ms  "
           f"mfu {info['mfu']:.3f}")
    if compiled:  # a break leaves eager Python inside the compiled step: the row is not what it claims to be
        info["graph_breaks"] = graph_break_count() - breaks
        row += f"  {info['graph_breaks']} graph breaks" if info["graph_breaks"] else ""
    base = _FULL_SECONDS.get((batch, compiled))
    if base is not None and not provider.startswith("full"):
        info["speedup_vs_full"] = round(base / seconds, 2)
        row += f"  {base / seconds:5.2f}x full (FLOP ratio {full_flops / flops:.2f}x)"
    benchmark.extra_info.update(info)
    _ROWS.append(row)
