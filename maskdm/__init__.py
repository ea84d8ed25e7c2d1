"""maskdm: masked diffusion pre-training (MaskDM) of pixel-space U-ViT denoisers on maskdm_kernels.

    from maskdm import GaussianDiffusion, create_model, masking
"""

from . import masking
from .diffusion import GaussianDiffusion
from .model import PRESETS, MaskedViT, create_model

__all__ = ["PRESETS", "GaussianDiffusion", "MaskedViT", "create_model", "masking"]
