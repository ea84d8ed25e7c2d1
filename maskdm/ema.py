"""Exponential moving average of the weights, and the per-stage decay schedules.

``ema_schedule`` (a stage key):
    constant     decay = ema_decay from the stage's first step (the EMA starts as a copy of the weights).
    warmup       decay = min(ema_decay, (1 + n) / (10 + n)).
    ema_pytorch  what the reference code gets from ``ema_pytorch.EMA(beta=ema_decay)`` with its defaults
                 (update_after_step=100, inv_gamma=1, power=2/3, min_value=0) updated every step: a hard copy
                 for the stage's first 100 steps, then decay = clamp(1 - (1 + k)^(-2/3), 0, ema_decay) with
                 k = s - 101 at the stage's 1-based step s (0.999 is reached near s = 31.7k).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "SCHEDULES", "ema_decay"]

SCHEDULES = ("constant", "warmup", "ema_pytorch")
_UPDATE_AFTER = 100  # ema_pytorch's update_after_step
_POWER = 2.0 / 3.0  # ema_pytorch's power (inv_gamma = 1)


def ema_decay(schedule: str, decay: float, n: int) -> float:
    """The decay of the EMA update after the stage's ``n``-th optimizer step (``n`` counts from 0)."""
    if schedule == "constant":
        return decay
    if schedule == "warmup":
        return min(decay, (1 + n) / (10 + n))
    if schedule == "ema_pytorch":
        s = n + 1
        if s <= _UPDATE_AFTER:
            return 0.0  # lerp with weight 1: an exact copy
        return min(max(1.0 - (1.0 + (s - _UPDATE_AFTER - 1)) ** -_POWER, 0.0), decay)
    raise ValueError(f"ema_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


class EMA:
    """An fp32 EMA copy of ``model``'s parameters (buffers copied), kept as a module for sampling.

    ``update`` is two foreach ops on the device (lerp of the parameters, copy of the buffers): no per-parameter
    Python loop and no host sync, so it can be traced into a compiled step."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        self._src_p = [p for p in model.parameters()]
        self._dst_p = [p for p in self.model.parameters()]
        self._src_b = [b for b in model.buffers()]
        self._dst_b = [b for b in self.model.buffers()]
        if len(self._src_p) != len(self._dst_p) or len(self._src_b) != len(self._dst_b):
            raise ValueError("EMA: the model's parameters do not match the EMA copy's")

    def reset(self, model: nn.Module) -> None:
        """Make the EMA an exact copy of ``model`` (and track ``model`` from now on)."""
        self.model.load_state_dict(model.state_dict())
        self._bind(model)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * online, for every parameter at once."""
        torch._foreach_lerp_(self._dst_p, self._src_p, 1.0 - decay)
        if self._dst_b:
            torch._foreach_copy_(self._dst_b, self._src_b)
