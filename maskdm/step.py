"""One training step: forward + loss, backward, gradient norm (and clipping), optimizer step, EMA update.

    step = TrainStep(model, module, diffusion, optimizer, ema, grad_clip=1.0, bf16=False)
    loss, grad_norm = step(x0, t, noise, vis, lr=2e-4, ema_decay=0.999)

The loop (``maskdm/train.py``) draws the inputs and owns everything host-side (logging, checkpoints, signals);
this file owns the device work of a step, so it can be compiled or captured as one unit. No host sync: the
loss and the gradient norm come back as 0-dim device tensors.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from maskdm_kernels import Visible

from .ema import EMA

__all__ = ["Denoiser", "LossView", "StepResult", "TrainStep"]


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


class TrainStep:
    """The device work of one optimizer step of one stage (a new one per stage: the optimizer changes).

    ``model``: the bare network (parameters, clipping); ``module``: what the forward goes through (``Denoiser``
    or DDP around it); ``grad_clip`` 0 disables clipping (the norm is still computed: the loop stops a run whose
    loss or gradient norm is non-finite)."""

    def __init__(self, model: nn.Module, module: nn.Module, diffusion, optimizer: torch.optim.Optimizer, ema: EMA,
                 grad_clip: float, bf16: bool):
        self.model, self.diffusion, self.optimizer, self.ema = model, diffusion, optimizer, ema
        self.view = LossView(module, model)
        self.params = list(model.parameters())
        self.grad_clip = grad_clip
        self.device_type = self.params[0].device.type
        self.bf16 = bf16

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, x0: Tensor, t: Tensor, noise: Tensor, vis: Visible | None, lr: float,
                 ema_decay: float) -> StepResult:
        """``x0 (b, C, H, W)`` in [-1, 1], ``t (b,)`` int64, ``noise (b, C, H, W)``, ``vis``: the kept patches of
        the ``b`` samples (None: full images)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with self._autocast():
            loss = self.diffusion.loss(self.view, x0, vis, t=t, noise=noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.optimizer.step()
        self.ema.update(ema_decay)
        return StepResult(loss.detach().float(), gnorm.detach().float())
