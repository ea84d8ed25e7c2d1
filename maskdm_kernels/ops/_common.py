"""Input checks shared by the patch ops, and the registration of compiled kernels as backends.

Checks read shapes, dtypes and devices only (never tensor values), so they cost no device sync and trace
under torch.compile."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Parameter

from .. import _cpp_lib
from ..dispatch import register
from ..layout import Visible

_dispatch_modes = torch._C._len_torch_dispatch_stack

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def direct(t: Tensor) -> bool:
    """True when a call on ``t`` may run its backend's kernel straight from Python, skipping the custom op:
    eager mode, a plain tensor, no dispatch mode on (FakeTensorMode, FlopCounterMode, ...: they must see the op).

    NOTE: the custom op's own dispatch (its Python autograd kernel, then the Python impl) costs several times the
    kernel's launch on the host. Measured on this repo's CI CPU (loaded), an elementwise kernel behind each
    wrapper, fwd+bwd: custom_op + register_autograd 852 us, autograd.Function 546 us, plain aten 389 us.
    Under torch.compile the custom op is what gets traced (one node, its fake), so this path is eager only."""
    return ((type(t) is Tensor or type(t) is Parameter) and not torch.compiler.is_compiling()
            and not _dispatch_modes())


def fail(op: str, arg: str, msg: str, exc=ValueError):
    raise exc(f"{op}: {arg} {msg}")


def check_visible(op: str, vis, device: torch.device, batch: int | None = None) -> None:
    if not isinstance(vis, Visible):
        fail(op, "vis", f"must be a maskdm_kernels.Visible, got {type(vis).__name__}", TypeError)
    if vis.ids.device != device:
        fail(op, "vis", f"is on {vis.ids.device} but the tensors are on {device}")
    if batch is not None and vis.batch_size != batch:
        fail(op, "vis.cu_seqlens", f"has {vis.batch_size + 1} entries (B + 1) but the batch has B={batch}")


def check_float(op: str, arg: str, t, dim: int | None = None) -> None:
    if not isinstance(t, Tensor):
        fail(op, arg, f"must be a tensor, got {type(t).__name__}", TypeError)
    if t.dtype not in FLOAT_DTYPES:
        fail(op, arg, f"must be float32, float16 or bfloat16, got {t.dtype}", TypeError)
    if dim is not None and t.dim() != dim:
        fail(op, arg, f"must be {dim}-D, got shape {tuple(t.shape)}")


def check_images(op: str, arg: str, t) -> None:
    """A ``(B, C, H, W)`` float tensor with at least one channel (C = 0 has no pixel to read: no loss to average)."""
    check_float(op, arg, t, 4)
    if t.shape[1] < 1:
        fail(op, arg, f"must have at least one channel, got shape {tuple(t.shape)}")


def check_patch_size(op: str, patch_size, height: int, width: int, arg: str = "patch_size") -> None:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        fail(op, arg, f"must be a positive int, got {patch_size!r}", TypeError)
    if height % patch_size or width % patch_size:
        fail(op, arg, f"={patch_size} must divide the image height and width, got {height}x{width}")


def check_num_patches(op: str, vis: Visible, patch_size: int, height: int, width: int) -> None:
    n = (height // patch_size) * (width // patch_size)
    if vis.num_patches != n:
        fail(op, "vis.num_patches", f"={vis.num_patches} but a {height}x{width} image with patch_size={patch_size} "
             f"has {n} patches")


def check_per_sample(op: str, arg: str, t, batch: int, device: torch.device) -> None:
    if t is None:
        return
    check_float(op, arg, t, 1)
    if t.shape[0] != batch:
        fail(op, arg, f"must have shape ({batch},) (one value per sample), got {tuple(t.shape)}")
    if t.device != device:
        fail(op, arg, f"is on {t.device} but the images are on {device}")


def compiled_kernel_reasons(kernel: str):
    """Extra reasons for the ``cpu`` / ``cuda`` backends: the extension must carry ``kernel``."""

    def reasons(**caps) -> list[str]:
        if _cpp_lib.loaded() and not _cpp_lib.has_kernel(kernel):
            return [f"the built extension has no {kernel} (rebuild: pip install --no-build-isolation -e .)"]
        return []

    return reasons


def register_compiled(op: str, kernel: str):
    """Register ``torch.ops.maskdm.<kernel>`` as the ``cpu`` and ``cuda`` backends of ``op``."""

    def impl(*args):
        return getattr(torch.ops.maskdm, kernel)(*args)

    reasons = compiled_kernel_reasons(kernel)
    register(op, "cpu", reasons)(impl)
    register(op, "cuda", reasons)(impl)
