"""maskdm_kernels: fused kernels for masked diffusion training (gather + noising, varlen attention, loss).

Every op dispatches among the ``cuda``, ``triton``, ``cpu`` and ``torch`` backends (see ``dispatch``);
``python -m maskdm_kernels.info`` says which one each op uses on this machine and why.
"""

from . import reference
from .dispatch import BACKENDS, backend, current_backend
from .layout import Visible
from .ops.attention import attention
from .ops.gather_patches import gather_patches
from .ops.masked_noise_loss import masked_noise_loss
from .ops.scatter_patches import scatter_patches
from .ops.varlen_attention import varlen_attention

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Visible",
    "attention",
    "backend",
    "current_backend",
    "gather_patches",
    "masked_noise_loss",
    "reference",
    "scatter_patches",
    "varlen_attention",
]
