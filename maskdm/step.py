"""One training step: forward + loss, backward, gradient norm (and clipping), optimizer step, EMA update.

    step = TrainStep(model, module, diffusion, optimizer, ema, grad_clip=1.0, bf16=False)
    loss, grad_norm = step(x0, t, noise, vis, lr=2e-4, ema_decay=0.999)

The loop (``maskdm/train.py``) draws the inputs and owns everything host-side (logging, checkpoints, signals);
this file owns the device work of a step, so it can be compiled or captured as one unit. No host sync: the
loss and the gradient norm come back as 0-dim device tensors.

``train.compile`` (``resolve_compile``) compiles the loss and its backward (``TrainStep(compile=...)``); varlen
masks then run on a static-capacity layout (``masking.pad_batch``) so no step has a new shape. ``cuda_graph=True``
captures the whole step (loss, backward, clip, AdamW, EMA) and replays it. Sampling and evaluation get the
compiled forward from ``compile_forward``.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from maskdm_kernels import Visible

from . import masking
from .ema import EMA

__all__ = ["CAPACITY_SLACK", "COMPILE_MODES", "Denoiser", "LossView", "StepResult", "TrainStep", "compile_count",
           "compile_forward", "graph_break_count", "resolve_compile", "step_options"]


class Denoiser(nn.Module):
    """The module DDP wraps: one ``forward`` for both entry points of ``MaskedViT``, so the masked path
    (``forward_tokens``) also runs inside ``DDP.forward`` and its gradients are all-reduced."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor, t: Tensor, vis: Visible | None = None, tokens: bool = False, **kw) -> Tensor:
        if tokens:
            return self.net.forward_tokens(inputs, t, vis, **kw)
        return self.net(inputs, t, vis, **kw)


class LossView:
    """What ``GaussianDiffusion.loss`` calls: both of its model calls go through ``module`` (DDP or not)."""

    def __init__(self, module: nn.Module, net: nn.Module):
        self.module = module
        self.patch_size = net.patch_size

    def __call__(self, x: Tensor, t: Tensor, **kw) -> Tensor:
        return self.module(x, t, **kw)

    def forward_tokens(self, tokens: Tensor, t: Tensor, vis: Visible, **kw) -> Tensor:
        return self.module(tokens, t, vis, tokens=True, **kw)


class StepResult(NamedTuple):
    loss: Tensor  # () fp32, detached: the step's loss (this rank's share of the batch)
    grad_norm: Tensor  # () fp32: total L2 norm of the gradients before clipping


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "auto")
_GRAPH_WARMUP = 3  # eager steps on a side stream before a capture: optimizer state, autotuning, cuBLAS workspaces
# Static capacity of a compiled varlen stage: mean + 4 standard deviations of T (a rarer draw runs on the
# guaranteed capacity: one more compile, logged). A captured step takes the guaranteed one: it has one shape.
CAPACITY_SLACK = 4.0


def resolve_compile(mode: str | bool, device, cuda_graph: bool = False) -> str:
    """``train.compile`` for ``device``: ``auto`` is ``reduce-overhead`` on CUDA (compiled step, forward and
    backward replayed as CUDA graphs; ``default`` when ``cuda_graph`` captures the step itself) and ``off`` on
    CPU (where compiling costs minutes and gains little)."""
    if isinstance(mode, bool):  # YAML reads a bare off / on as false / true
        mode = "default" if mode else "off"
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "auto":
        if torch.device(device).type != "cuda":
            return "off"
        return "default" if cuda_graph else "reduce-overhead"
    return mode


def step_options(train_cfg, stage, batch: int, grid, device) -> dict:
    """``TrainStep`` keyword arguments for a stage: the resolved compile mode, ``cuda_graph``, and a static
    capacity when the step compiles or is captured and the stage's mask ratio is a range (varlen).
    ``batch``: this process's share of the stage's batch."""
    mode = resolve_compile(train_cfg.compile, device, train_cfg.cuda_graph)
    cap = None
    if (mode != "off" or train_cfg.cuda_graph) and isinstance(stage.mask_ratio, (tuple, list)) and \
            stage.mask in ("random", "block"):
        cap = masking.static_capacity(batch, grid, tuple(stage.mask_ratio),
                                      stage.block_size if stage.mask == "block" else 1,
                                      slack=None if train_cfg.cuda_graph else CAPACITY_SLACK)
    return {"compile": mode, "capacity": cap, "cuda_graph": bool(train_cfg.cuda_graph)}


def compile_forward(model: nn.Module, mode: str) -> nn.Module:
    """``model`` for sampling / evaluation: ``torch.compile``d with ``mode`` (a resolved mode), or itself for
    ``off``. Shapes are static (``dynamic=False``): a sampler calls it with one batch shape, so each shape
    compiles once (the last, smaller batch of a run is a second one)."""
    if mode == "off":
        return model
    return torch.compile(model, mode=mode, dynamic=False)


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process (``torch._dynamo``'s ``unique_graphs`` counter): a step that
    recompiles shows up as this number growing after the first step."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_break_count() -> int:
    """Graph breaks Dynamo has met in this process: each one splits the compiled step into pieces, with eager
    Python between them (and, under reduce-overhead, one CUDA graph per piece)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


class TrainStep:
    """The device work of one optimizer step of one stage (a new one per stage: the optimizer changes).

    ``model``: the bare network (parameters, clipping); ``module``: what the forward goes through (``Denoiser``
    or DDP around it); ``grad_clip`` 0 disables clipping (the norm is still computed: the loop stops a run whose
    loss or gradient norm is non-finite).

    ``compile``: a resolved ``train.compile`` mode (``resolve_compile``). Not ``off``: the loss (gather + noising,
    model, masked loss) is ``torch.compile``d with static shapes, and AOTAutograd compiles its backward;
    ``reduce-overhead`` / ``max-autotune`` replay both as CUDA graphs on a GPU. The clip, the (fused, on CUDA)
    AdamW and the EMA stay a handful of foreach launches. ``compiles`` / ``recompiles`` count the graphs Dynamo
    built during this step's calls, in all and after its first call (a per-step recompile shows up there).

    ``capacity``: varlen masks are padded to it (``pad_batch``) so every step has the same shapes (a draw that
    exceeds a slack capacity runs on ``capacity.guaranteed()``); the loop passes one whenever the step compiles
    or is captured and the stage's ratio is a range.

    ``cuda_graph``: capture the whole step (loss, backward, clip, AdamW, EMA) once with ``torch.cuda.graph``
    after ``_GRAPH_WARMUP`` eager steps on a side stream, then replay it: one launch per step. The inputs are
    copied into static buffers; the learning rate and the EMA weight live in device tensors (AdamW is made
    ``capturable`` with a tensor ``lr``), so no value is frozen into the graph. Needs CUDA, one process, static
    shapes, and ``compile`` ``off`` or ``default`` (the others already capture).
    """

    def __init__(self, model: nn.Module, module: nn.Module, diffusion, optimizer: torch.optim.Optimizer, ema: EMA,
                 grad_clip: float, bf16: bool, *, compile: str = "off",
                 capacity: masking.StaticCapacity | None = None, cuda_graph: bool = False):
        self.model, self.diffusion, self.optimizer, self.ema = model, diffusion, optimizer, ema
        self.view = LossView(module, model)
        self.params = list(model.parameters())
        self.grad_clip = grad_clip
        self.device = self.params[0].device
        self.device_type = self.device.type
        self.bf16 = bf16
        if compile not in COMPILE_MODES or compile == "auto":
            raise ValueError(f"TrainStep: compile must be a resolved mode (off, default, reduce-overhead, "
                             f"max-autotune), got {compile!r}; see resolve_compile")
        if cuda_graph:
            why = [w for ok, w in ((self.device_type == "cuda", "a CUDA device"),
                                   (compile in ("off", "default"), "compile off or default (not a cudagraph mode)"),
                                   (isinstance(module, Denoiser) or module is model, "one process (no DDP)"))
                   if not ok]
            if why:
                raise ValueError(f"TrainStep: cuda_graph=True needs {', '.join(why)}")
        self.compile, self.capacity, self.cuda_graph = compile, capacity, cuda_graph
        if compile != "off":  # fill the schedule's per-device table cache now: filled inside the graph, it recompiles
            t0 = torch.zeros(1, dtype=torch.long, device=self.device)
            for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "snr"):
                diffusion._at(name, t0)
        self._loss = self._loss_eager if compile == "off" else torch.compile(self._loss_eager, mode=compile,
                                                                            dynamic=False)
        self.compiles = self.recompiles = self.graph_breaks = self._calls = 0
        self._pad_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self._graph = self._side = None
        self._warm = 0

    def compile_stats(self) -> dict:
        """For the log record: graphs compiled during this step's calls, how many after its first call, and the
        graph breaks met."""
        if self.compile == "off":
            return {}
        return {"compiles": self.compiles, "recompiles": self.recompiles, "graph_breaks": self.graph_breaks}

    def _autocast(self):
        if self.bf16:  # no cast cache inside a captured graph: cached casts would be stale on replay
            return torch.autocast(self.device_type, dtype=torch.bfloat16, cache_enabled=not self.cuda_graph)
        return contextlib.nullcontext()

    def _loss_eager(self, x0: Tensor, t: Tensor, noise: Tensor, vis: Visible | None, weight: Tensor | None) -> Tensor:
        with self._autocast():
            return self.diffusion.loss(self.view, x0, vis, t=t, noise=noise, weight=weight)

    def __call__(self, x0: Tensor, t: Tensor, noise: Tensor, vis: Visible | None, lr: float,
                 ema_decay: float) -> StepResult:
        """``x0 (b, C, H, W)`` in [-1, 1], ``t (b,)`` int64, ``noise (b, C, H, W)``, ``vis``: the kept patches of
        the ``b`` samples (None: full images)."""
        weight = None
        if self.capacity is not None and vis is not None:
            cap = self.capacity if self.capacity.fits(vis) else self.capacity.guaranteed()
            zeros, w = self._pad_cache.get(cap.tokens, (None, None))  # per capacity: the zero rows, the weights
            if zeros is None:
                zeros = x0.new_zeros(cap.fillers, *x0.shape[1:])
            x0, t, noise, vis, weight = masking.pad_batch(x0, t, noise, vis, cap, zeros, w)
            self._pad_cache[cap.tokens] = (zeros, weight)
        if self.compile == "off":
            return self._run(x0, t, noise, vis, weight, lr, ema_decay)
        before, breaks = compile_count(), graph_break_count()
        out = self._run(x0, t, noise, vis, weight, lr, ema_decay)
        n = compile_count() - before
        self.graph_breaks += graph_break_count() - breaks
        self.compiles += n
        self.recompiles += n if self._calls else 0
        self._calls += 1
        return out

    def _run(self, x0, t, noise, vis, weight, lr, ema_decay) -> StepResult:
        if self.cuda_graph:
            return self._graphed(x0, t, noise, vis, weight, lr, ema_decay)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss = self._loss(x0, t, noise, vis, weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = self._clip()
        self.optimizer.step()
        self.ema.update(ema_decay)
        return StepResult(loss.detach().float(), gnorm.detach().float())

    def _clip(self) -> Tensor:
        if self.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    # ------------------------------------------------------------------------------------ whole-step graph
    def _device_step(self, x0, t, noise, vis, weight) -> tuple[Tensor, Tensor]:
        """Loss, backward, clip, AdamW, EMA with the lr and EMA weight read from device tensors."""
        loss = self._loss(x0, t, noise, vis, weight)
        loss.backward()
        gnorm = self._clip()
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._ema_dst, self.params, [self._ema_w] * len(self.params))
            if self._ema_buf:
                torch._foreach_copy_(self._ema_buf, list(self.model.buffers()))
        return loss.detach().float(), gnorm.detach().float()

    def _graphed(self, x0, t, noise, vis, weight, lr, ema_decay) -> StepResult:
        if self._warm == 0:  # once: device-tensor lr and EMA weight, a capturable optimizer
            self._lr = torch.tensor(float(lr), device=self.device)
            for g in self.optimizer.param_groups:
                g["lr"], g["capturable"] = self._lr, True
            self._ema_w = torch.zeros((), device=self.device)
            self._ema_dst = list(self.ema.model.parameters())
            self._ema_buf = list(self.ema.model.buffers())
        self._lr.fill_(lr)
        self._ema_w.fill_(1.0 - ema_decay)
        if self._graph is None and self._warm < _GRAPH_WARMUP:
            self._warm += 1
            if self._side is None:  # one side stream: freed warm-up blocks stay in its allocator pool for the next
                self._side = torch.cuda.Stream()
            side = self._side
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                loss, gnorm = self._device_step(x0, t, noise, vis, weight)
            torch.cuda.current_stream().wait_stream(side)
            return StepResult(loss, gnorm)
        args = (x0, t, noise, None if vis is None else vis.ids, None if vis is None else vis.cu_seqlens, weight)
        if self._graph is None:
            self._static = [None if a is None else a.clone() for a in args]
            self._vis_meta = None if vis is None else (vis.max_seqlen, vis.num_patches, vis.uniform)
            sx, st, sn, sids, scu, sw = self._static
            svis = None if vis is None else Visible(sids, scu, *self._vis_meta)
            self.optimizer.zero_grad(set_to_none=True)  # the backward inside the graph allocates (then rewrites) them
            self._graph = torch.cuda.CUDAGraph()
            # thread_local: the data loader's pin-memory thread keeps using CUDA while this thread captures
            with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
                self._out = self._device_step(sx, st, sn, svis, sw)
        else:
            meta = None if vis is None else (vis.max_seqlen, vis.num_patches, vis.uniform)
            for a, s in zip(args, self._static):
                if (a is None) != (s is None) or (a is not None and a.shape != s.shape):
                    raise ValueError("TrainStep: a captured step needs the same input shapes every step "
                                     f"(captured {[None if s is None else tuple(s.shape) for s in self._static]})")
            if meta != self._vis_meta:
                raise ValueError(f"TrainStep: a captured step needs the same layout every step: captured "
                                 f"(max_seqlen, num_patches, uniform) = {self._vis_meta}, got {meta}")
            for a, s in zip(args, self._static):
                if a is not None:
                    s.copy_(a, non_blocking=True)
        self._graph.replay()
        return StepResult(self._out[0].clone(), self._out[1].clone())
