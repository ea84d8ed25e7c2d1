"""MaskedViT: the U-ViT denoiser of MaskDM, running on packed visible tokens.

The model predicts the noise epsilon. Four entry points, all running the shared core ``forward_tokens``:

- ``model(x, t)``: images ``(B, C, H, W)`` to images (full fine-tuning and sampling);
- ``model(x, t, vis)``: reads only the visible patches of ``x``, returns ``(T, p*p*C)`` packed tokens;
- ``model(x, t, mask=bool_mask)``: the paper's boolean mask ``(B, N)`` (True = masked) for drop-in use;
- ``model.forward_tokens(tokens, t, vis)``: packed patch pixels ``(T, p*p*C)`` in, ``(T, p*p*C)`` out.

Tokens stay packed ``(T + k*B, D)`` through every block, where ``k`` is the number of extra tokens per
sample (the time token, and the class token when ``num_classes > 0``). Sample ``b``'s sequence is
``[time, (class), its visible patches]`` and starts at ``cu_seqlens[b] + k*b``: the extra tokens are placed
by index arithmetic on ``cu_seqlens`` (no host sync, no padding), attention runs through
``maskdm_kernels.varlen_attention`` with ``cu_seqlens + k * arange(B + 1)``.

State-dict keys (stable; ``D`` = embed_dim, ``P`` = p*p*C, ``N`` = number of patches, ``k`` = extra tokens):

    pos_embed                               (1, k + N, D)  index 0: time token, 1: class token, k + id: patch
    patch_embed.weight, patch_embed.bias    (D, P), (D,)   a linear map on patch pixels in (p1 p2 c) order
                                                           (= U-ViT's conv with kernel = stride = p)
    time_embed.0.weight/bias, time_embed.2.weight/bias     only with mlp_time_embed=True: (4D, D), (D, 4D)
    label_emb.weight                        (num_classes + 1, D)   only with num_classes > 0; the last row
                                                           is the "no class" label used by guidance
    {in_blocks.i | mid_block | out_blocks.i}.
        norm1.weight, norm1.bias            (D,)
        attn.qkv.weight                     (3D, D)        fused [q; k; v], heads contiguous inside each
        attn.qkv.bias                       (3D,)          only with qkv_bias=True
        attn.proj.weight, attn.proj.bias    (D, D), (D,)
        norm2.weight, norm2.bias            (D,)
        mlp.fc1.weight, mlp.fc1.bias        (mlp_ratio*D, D), (mlp_ratio*D,)
        mlp.fc2.weight, mlp.fc2.bias        (D, mlp_ratio*D), (D,)
    out_blocks.i.skip_linear.weight/bias    (D, 2D), (D,)  projects concat([x, skip]) to D
    norm.weight, norm.bias                  (D,)           final LayerNorm
    head.weight, head.bias                  (P, D), (P,)   per-token prediction of the patch's noise

with ``i`` in ``range(depth // 2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdm_kernels import Visible, attention, gather_patches, varlen_attention

__all__ = ["PRESETS", "MaskedViT", "create_model", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` float32, ``[cos, sin]`` halves (U-ViT / DDPM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    """Multi-head self-attention over packed sequences: fused qkv, then ``attention`` on the ``(B, L, H, Dh)`` view
    when every sequence has the same length, else ``varlen_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MaskedViT: embed_dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        T, D = x.shape
        B = cu_seqlens.shape[0] - 1
        qkv = self.qkv(x)
        if T == B * max_seqlen:  # every sequence is max_seqlen long (shapes only, no sync): the uniform op
            q, k, v = qkv.view(B, max_seqlen, 3, self.num_heads, self.head_dim).unbind(2)  # 3 x (B, L, H, Dh)
            out = attention(q, k, v)
        else:
            q, k, v = qkv.view(T, 3, self.num_heads, self.head_dim).unbind(1)  # 3 x (T, H, Dh), strided
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # (T, H, Dh)
        return self.proj(out.reshape(T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; with ``skip=True`` it first projects ``concat([x, skip])`` from 2D to D."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(s, int) for s in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"MaskedViT: {name} must be an int or an (H, W) pair of ints, got {v!r}")


class MaskedViT(nn.Module):
    """U-ViT (as in MaskDM) that trains on the visible patches only.

    Args:
        img_size: H (square) or ``(H, W)``.
        patch_size: p; must divide H and W.
        in_chans: C.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer; ``depth`` counts every block:
            ``depth // 2`` in-blocks, one mid block, ``depth // 2`` out-blocks with long skips (LIFO).
        num_classes: > 0 adds a class token (``y`` argument); ``y=None`` then means "no class" (the
            unconditional branch of classifier-free guidance).
        class_dropout: in training mode, the probability that a label is replaced by "no class", so one
            model learns both branches of classifier-free guidance.
        mlp_time_embed: pass the sinusoidal time embedding through Linear-SiLU-Linear (U-ViT option; MaskDM
            configs use False).
    """

    def __init__(self, img_size, patch_size: int, in_chans: int = 3, embed_dim: int = 512, depth: int = 13,
                 num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = False, num_classes: int = 0,
                 class_dropout: float = 0.1, mlp_time_embed: bool = False):
        super().__init__()
        H, W = _pair(img_size, "img_size")
        if not isinstance(patch_size, int) or patch_size < 1 or H % patch_size or W % patch_size:
            raise ValueError(f"MaskedViT: patch_size={patch_size!r} must be a positive int dividing the image "
                             f"size {H}x{W}")
        head_dim = embed_dim // num_heads if num_heads > 0 else 0
        if num_heads < 1 or embed_dim % num_heads or head_dim % 8 or not 8 <= head_dim <= 128:
            raise ValueError(f"MaskedViT: embed_dim / num_heads = {embed_dim} / {num_heads} must be a head dim "
                             f"that is a multiple of 8 in [8, 128] (what varlen_attention supports)")
        if depth < 1 or depth % 2 == 0:
            raise ValueError(f"MaskedViT: depth={depth} must be odd (depth // 2 in-blocks, 1 mid, depth // 2 out)")
        self.img_size = (H, W)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = (H // patch_size, W // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_dim = patch_size * patch_size * in_chans
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.extras = 1 + (num_classes > 0)

        self.patch_embed = nn.Linear(self.patch_dim, embed_dim)
        if mlp_time_embed:
            self.time_embed = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                            nn.Linear(4 * embed_dim, embed_dim))
        else:
            self.time_embed = nn.Identity()
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes + 1, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.num_patches, embed_dim))
        self.in_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth // 2))
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=True)
                                        for _ in range(depth // 2))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, self.patch_dim)

        # U-ViT init: trunc-normal(0.02) for the position embedding and every Linear, LayerNorm (1, 0); the
        # patch embedding keeps PyTorch's conv/linear default, as U-ViT's Conv2d does.
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)
        self.patch_embed.reset_parameters()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            if not m.weight.is_meta:
                nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        """The label index meaning "no class" (unconditional), = ``num_classes``."""
        return self.num_classes

    # ----------------------------------------------------------------------------------------------- entry
    def forward(self, x: Tensor, t, vis: Visible | None = None, *, mask: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
        """Predict the noise.

        Args:
            x: images ``(B, C, H, W)`` (noised), any strides.
            t: timesteps ``(B,)`` (int or float), or a python number / 0-d tensor for the whole batch.
            vis: the kept patches; ``None`` with ``mask=None`` runs on every patch.
            mask: bool ``(B, N)``, True = masked (the paper's convention). Converting it costs one host sync;
                prefer ``vis`` from ``maskdm.masking``.
            y: int64 ``(B,)`` class labels when ``num_classes > 0`` (``None``: unconditional).
        Returns:
            ``(B, C, H, W)`` without ``vis`` / ``mask``; else ``(T, p*p*C)`` for the visible patches, packed
            sample-major in ascending patch id (``vis`` order).
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_chans, *self.img_size):
            raise ValueError(f"MaskedViT: x must be (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), "
                             f"got {tuple(x.shape)}")
        if mask is not None:
            if vis is not None:
                raise ValueError("MaskedViT: pass either vis or mask, not both")
            vis = Visible.from_mask(mask.to(device=x.device, dtype=torch.bool))  # one host sync
        if vis is None:
            B, C, H, W = x.shape
            p = self.patch_size
            gh, gw = self.grid_size
            tokens = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(B * gh * gw, p * p * C)
            out = self.forward_tokens(tokens, t, Visible.full(B, self.num_patches, x.device), y=y)
            return out.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return self.forward_tokens(gather_patches(x, vis, self.patch_size), t, vis, y=y)

    # ------------------------------------------------------------------------------------------------ core
    def forward_tokens(self, tokens: Tensor, t, vis: Visible, y: Tensor | None = None) -> Tensor:
        """The shared core on packed patch pixels.

        Args:
            tokens: ``(T, p*p*C)`` pixels of the visible patches, ``(p1 p2 c)`` order, in ``vis`` order.
            t: ``(B,)`` timesteps (or one for the batch).
            vis: the layout of ``tokens``.
            y: optional ``(B,)`` labels (class-conditional models).
        Returns:
            ``(T, p*p*C)`` predicted noise of the same patches.
        """
        if not isinstance(vis, Visible):
            raise TypeError(f"MaskedViT: vis must be a maskdm_kernels.Visible, got {type(vis).__name__}")
        if vis.num_patches != self.num_patches:
            raise ValueError(f"MaskedViT: vis.num_patches={vis.num_patches} but the model has {self.num_patches} "
                             f"patches ({self.img_size[0]}x{self.img_size[1]}, p={self.patch_size})")
        if tokens.dim() != 2 or tokens.shape[0] != vis.total or tokens.shape[1] != self.patch_dim:
            raise ValueError(f"MaskedViT: tokens must be (T, p*p*C) = ({vis.total}, {self.patch_dim}), "
                             f"got {tuple(tokens.shape)}")
        B, T, k, D = vis.batch_size, vis.total, self.extras, self.embed_dim
        t = torch.as_tensor(t, device=tokens.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"MaskedViT: t must be a scalar or ({B},), got {tuple(t.shape)}")

        pos = self.pos_embed[0]  # (k + N, D)
        x = self.patch_embed(tokens)  # (T, D)
        full = vis.uniform and vis.max_seqlen == self.num_patches  # ids are arange(N) in every sample
        if full:
            x = (x.view(B, self.num_patches, D) + pos[k:]).view(T, D)
        else:
            x = x + pos[k + vis.ids.long()]  # (T, D) position of each kept patch
        extra = [self.time_embed(timestep_embedding(t, D)).to(x.dtype)]  # (B, D)
        if k == 2:
            extra.append(self.label_emb(self._labels(y, B, tokens.device)).to(x.dtype))
        extra = torch.stack(extra, dim=1) + pos[:k]  # (B, k, D)

        # Pack [extras, patches] per sample: sample b starts at cu_seqlens[b] + k * b.
        ar = torch.arange(B + 1, device=tokens.device, dtype=torch.int32)
        cu = vis.cu_seqlens + k * ar  # int32 (B + 1,)
        max_seqlen = vis.max_seqlen + k
        if vis.uniform:  # (B, k + Nv, D) is a plain view: concatenate, no index arithmetic needed
            h = torch.cat([extra, x.view(B, vis.max_seqlen, D)], dim=1).view(T + k * B, D)
            dest = None
        else:
            dest = torch.arange(T, device=tokens.device) + k * (vis.sample_index() + 1)  # patch rows
            dest_extra = (vis.cu_seqlens[:-1].long() + k * ar[:-1].long())[:, None] + torch.arange(
                k, device=tokens.device)  # (B, k) extra rows
            rows = torch.cat([dest_extra.reshape(-1), dest])
            h = x.new_empty(T + k * B, D).index_copy(0, rows, torch.cat([extra.reshape(B * k, D), x]))

        skips = []
        for blk in self.in_blocks:
            h = blk(h, cu, max_seqlen)
            skips.append(h)
        h = self.mid_block(h, cu, max_seqlen)
        for blk in self.out_blocks:
            h = blk(h, cu, max_seqlen, skips.pop())

        if dest is None:
            h = h.view(B, k + vis.max_seqlen, D)[:, k:].reshape(T, D)
        else:
            h = h.index_select(0, dest)
        return self.head(self.norm(h))  # (T, p*p*C)

    def _labels(self, y: Tensor | None, B: int, device) -> Tensor:
        if y is None:
            return torch.full((B,), self.null_class, dtype=torch.long, device=device)
        y = y.to(device=device, dtype=torch.long)
        if y.shape != (B,):
            raise ValueError(f"MaskedViT: y must be ({B},) class labels, got {tuple(y.shape)}")
        if self.training and self.class_dropout > 0:
            drop = torch.rand(B, device=device) < self.class_dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return y


# --------------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict] = {
    # CPU demo (Fashion-MNIST 32x32, p=2 on 2 cores): ~1.5M parameters.
    "uvit-tiny": {"img_size": 32, "patch_size": 2, "embed_dim": 128, "depth": 7, "num_heads": 4},
    # MaskDM "small": 512 wide, 13 blocks, 8 heads (~45M parameters at 256x256, p=4).
    "uvit-s": {"img_size": 256, "patch_size": 4, "embed_dim": 512, "depth": 13, "num_heads": 8},
    # MaskDM-B: 768 wide, 13 blocks, 12 heads (~102M parameters at 256x256, p=4).
    "uvit-b": {"img_size": 256, "patch_size": 4, "embed_dim": 768, "depth": 13, "num_heads": 12},
}


def create_model(name: str, **overrides) -> MaskedViT:
    """A ``MaskedViT`` from a preset (``uvit-tiny``, ``uvit-s``, ``uvit-b``); keyword arguments override it,
    e.g. ``create_model("uvit-tiny", in_chans=1)`` or ``create_model("uvit-b", img_size=64)``."""
    if name not in PRESETS:
        raise ValueError(f"create_model: unknown model {name!r}; expected one of {', '.join(PRESETS)}")
    return MaskedViT(**{**PRESETS[name], **overrides})
