"""MaskedViT: the packed masked path against the full path, packing leaks, drop-in mask, presets, compile."""

from __future__ import annotations

import pytest
import torch

import maskdm_kernels as mk
from maskdm import GaussianDiffusion, MaskedViT, create_model, masking
from maskdm_kernels.reference import patchify

from .utils import assert_close

ATOL, RTOL = 2e-5, 2e-5  # fp32, same weights, different token packing / attention batching


def small(num_classes: int = 0, **kw) -> MaskedViT:
    cfg = {"img_size": 16, "patch_size": 2, "in_chans": 3, "embed_dim": 32, "depth": 3, "num_heads": 2,
           "num_classes": num_classes}
    cfg.update(kw)
    return MaskedViT(**cfg).eval()


def varlen_visible(batch: int, n: int, seed: int = 0) -> mk.Visible:
    g = torch.Generator().manual_seed(seed)
    return masking.random_patches(batch, int(n ** 0.5), (0.2, 0.95), generator=g)


def per_sample(vis: mk.Visible, b: int) -> mk.Visible:
    cu = vis.cu_seqlens.tolist()
    ids = vis.ids[cu[b]:cu[b + 1]]
    return mk.Visible.from_index(ids[None], vis.num_patches)


@pytest.mark.parametrize("num_classes", [0, 5])
def test_all_visible_equals_full_forward(num_classes):
    model = small(num_classes)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([1, 4, 0]) if num_classes else None
    full = model(x, t, y=y)  # (B, C, H, W)
    assert full.shape == x.shape
    expected = patchify(full, 2).reshape(-1, 12)
    vis = mk.Visible.full(3, 64)
    assert_close(model(x, t, vis, y=y), expected, ATOL, RTOL, "Visible.full")
    # The same layout declared varlen goes through the index-arithmetic packing instead of the uniform view.
    varlen = mk.Visible.from_packed(vis.ids, vis.cu_seqlens, 64, max_seqlen=64)
    assert not varlen.uniform
    assert_close(model(x, t, varlen, y=y), expected, ATOL, RTOL, "varlen-declared full layout")


@pytest.mark.parametrize("num_classes", [0, 5])
def test_varlen_batch_equals_each_sample_alone(num_classes):
    model = small(num_classes)
    B = 5
    vis = varlen_visible(B, 64)
    assert not vis.uniform and len(set(vis.lengths.tolist())) > 1
    x = torch.randn(B, 3, 16, 16)
    t = torch.randint(0, 1000, (B,))
    y = torch.randint(0, 5, (B,)) if num_classes else None
    out = model(x, t, vis, y=y)
    assert out.shape == (vis.total, 12)
    cu = vis.cu_seqlens.tolist()
    for b in range(B):
        alone = model(x[b:b + 1], t[b:b + 1], per_sample(vis, b), y=None if y is None else y[b:b + 1])
        assert_close(out[cu[b]:cu[b + 1]], alone, ATOL, RTOL, f"sample {b}")


def test_sample_with_no_visible_patch():
    model = small()
    ids = torch.tensor([1, 5, 7], dtype=torch.int32)
    vis = mk.Visible.from_packed(ids, torch.tensor([0, 2, 2, 3], dtype=torch.int32), 64, max_seqlen=2)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    out = model(x, t, vis)
    assert out.shape == (3, 12)
    assert_close(out[2:], model(x[2:], t[2:], per_sample(vis, 2)), ATOL, RTOL, "after an empty sample")
    loss = GaussianDiffusion().loss(model, x, vis)
    loss.backward()
    assert torch.isfinite(loss)


def test_uniform_layout_equals_varlen_declared():
    model = small()
    vis = masking.block_patches(4, 8, 0.5, block_size=2, generator=torch.Generator().manual_seed(3))
    as_varlen = mk.Visible.from_packed(vis.ids, vis.cu_seqlens, 64, max_seqlen=vis.max_seqlen)
    x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,))
    assert_close(model(x, t, vis), model(x, t, as_varlen), ATOL, RTOL, "uniform vs varlen packing")


def test_masked_output_ignores_masked_pixels():
    model = small()
    vis = masking.block_patches(2, 8, 0.75, block_size=2, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 16, 16)
    keep = mk.scatter_patches(torch.ones(vis.total, 12), vis, 2, 16)  # 1 on visible pixels, 0 on masked
    x2 = x * keep + torch.randn_like(x) * 100 * (1 - keep)
    t = torch.tensor([10, 900])
    assert torch.equal(model(x, t, vis), model(x2, t, vis))
    assert not torch.equal(model(x, t), model(x2, t))  # the full path does see them


def test_boolean_mask_drop_in_equals_visible():
    model = small()
    mask = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) < 0.6  # True = masked, varlen
    vis = mk.Visible.from_mask(mask)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    assert torch.equal(model(x, t, mask=mask), model(x, t, vis))
    with pytest.raises(ValueError, match="either vis or mask"):
        model(x, t, vis, mask=mask)


def test_forward_tokens_is_the_core():
    model = small()
    vis = masking.random_patches(2, 8, 0.5, generator=torch.Generator().manual_seed(0))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 6])
    tokens = mk.gather_patches(x, vis, 2)
    assert torch.equal(model.forward_tokens(tokens, t, vis), model(x, t, vis))
    # a scalar timestep broadcasts over the batch
    assert torch.equal(model.forward_tokens(tokens, 7, vis), model.forward_tokens(tokens, torch.tensor([7, 7]), vis))


def test_class_conditioning():
    model = small(num_classes=4)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    null = torch.full((2,), model.null_class)
    assert torch.equal(model(x, t), model(x, t, y=null))  # y=None is the "no class" label
    assert not torch.equal(model(x, t, y=torch.tensor([0, 1])), model(x, t, y=torch.tensor([2, 3])))
    model.train()
    model.class_dropout = 1.0  # training drops every label
    assert torch.equal(model(x, t, y=torch.tensor([0, 1])), model(x, t))


def test_gradients_reach_every_parameter_in_a_masked_step():
    model = small(num_classes=3, mlp_time_embed=True).train()
    vis = masking.random_patches(3, 8, (0.3, 0.9), generator=torch.Generator().manual_seed(0))
    loss = GaussianDiffusion().loss(model, torch.randn(3, 3, 16, 16), vis, y=torch.tensor([0, 1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "pos_embed" and name != "label_emb.weight":
            assert p.grad.abs().sum() > 0, f"{name} got no gradient"
    # position embeddings of masked patches get none
    seen = torch.zeros(64, dtype=torch.bool)
    seen[vis.ids.long()] = True
    pos_grad = model.pos_embed.grad[0, 2:].abs().sum(1)
    assert (pos_grad[~seen] == 0).all() and (pos_grad[seen] > 0).all()


def test_state_dict_keys_are_stable():
    keys = set(small(num_classes=2, qkv_bias=True).state_dict())
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"pos_embed", "patch_embed.weight", "patch_embed.bias", "label_emb.weight", "norm.weight", "norm.bias",
                "head.weight", "head.bias", "out_blocks.0.skip_linear.weight", "out_blocks.0.skip_linear.bias"}
    expected |= {f"{prefix}.{k}" for prefix in ("in_blocks.0", "mid_block", "out_blocks.0") for k in block}
    assert keys == expected
    sd = small().state_dict()
    assert "attn.qkv.bias" not in " ".join(sd)  # qkv_bias=False by default
    assert sd["pos_embed"].shape == (1, 1 + 64, 32) and sd["head.weight"].shape == (12, 32)


def _count(name: str, **kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in create_model(name, **kw).parameters())


def uvit_params(D: int, depth: int, N: int, P: int, mlp_ratio: int = 4) -> int:
    block = 3 * D * D + (D * D + D) + 4 * D + (mlp_ratio * D * D + mlp_ratio * D) + (mlp_ratio * D * D + D)
    return depth * block + (depth // 2) * (2 * D * D + D) + (1 + N) * D + (P * D + D) + 2 * D + (D * P + P)


def test_preset_parameter_counts():
    assert _count("uvit-b") == uvit_params(768, 13, 4096, 48)
    assert 101.5e6 < _count("uvit-b") < 103e6  # MaskDM-B: ~102M at 256x256, p=4
    assert 44e6 < _count("uvit-s") < 46.5e6  # MaskDM small
    tiny = _count("uvit-tiny", in_chans=1)
    assert tiny == uvit_params(128, 7, 256, 4) and tiny < 2e6


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="head dim"):
        MaskedViT(16, 2, embed_dim=36, depth=3, num_heads=3)
    with pytest.raises(ValueError, match="depth"):
        MaskedViT(16, 2, embed_dim=32, depth=4, num_heads=2)
    with pytest.raises(ValueError, match="patch_size"):
        MaskedViT(18, 4, embed_dim=32, depth=3, num_heads=2)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("uvit-xl")
    model = small()
    with pytest.raises(ValueError, match="num_patches"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]), mk.Visible.full(1, 16))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]))
    with pytest.raises(ValueError, match="tokens"):
        model.forward_tokens(torch.randn(5, 12), torch.tensor([1]), mk.Visible.full(1, 64))


def test_bf16_autocast_masked_step():
    model = small().train()
    vis = masking.block_patches(2, 8, 0.5, block_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = GaussianDiffusion().loss(model, torch.randn(2, 3, 16, 16), vis)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_compiled_masked_training_step_matches_eager():
    """torch.compile(fullgraph=True) traces forward + loss (no graph break, no host sync); the compiled
    backward gives the eager gradients."""
    torch._dynamo.reset()
    model = small().train()
    diffusion = GaussianDiffusion()
    x, noise = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    t = torch.tensor([1, 500, 999])
    vis = masking.block_patches(3, 8, 0.75, block_size=2, generator=torch.Generator().manual_seed(0))

    def step(x, vis, t, noise):
        return diffusion.loss(model, x, vis, t=t, noise=noise)

    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x, vis, t, noise)
    loss_c.backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss_e = step(x, vis, t, noise)
    loss_e.backward()
    assert_close(loss_c, loss_e, 1e-5, 1e-5, "loss")
    for n, p in model.named_parameters():
        assert_close(grads_c[n], p.grad, 1e-5, 1e-4, n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync debug mode needs a CUDA device")
def test_masked_step_has_no_host_sync_on_cuda():
    model = small().cuda().train()
    diffusion = GaussianDiffusion()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    diffusion.loss(model, x).backward()  # warm-up: schedule tables move to the GPU once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for ratio in (0.75, (0.2, 0.9)):
            vis = masking.block_patches(4, 8, ratio, block_size=2, device="cuda")
            diffusion.loss(model, x, vis).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
