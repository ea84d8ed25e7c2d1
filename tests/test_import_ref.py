"""import-ref: reference (jiachenlei/maskdm) state dicts -> MaskedViT, checked against a float64 re-statement of the
reference forward (conv patch embedding, [class, time, patches] tokens, q/v-only bias), and the run folder it
writes read by sampling, evaluation loading and init_from."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskdm import MaskedViT
from maskdm.import_ref import convert_state_dict, import_reference, split_reference_checkpoint

D, P, C, IMG, HEADS, DEPTH = 32, 4, 3, 16, 2, 3  # their encoder_depth=2 builds 1 in, 1 mid, 1 out block


def reference_state_dict(num_classes: int = 0, qkv_bias: bool = False, seed: int = 0) -> dict:
    """Random tensors with the reference MaskedUViT's parameter names and shapes (models/mask_uvit.py)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.2

    n, k = (IMG // P) ** 2, 1 + (num_classes > 0)
    sd = {"encoder.patch_embed.proj.weight": r(D, C, P, P), "encoder.patch_embed.proj.bias": r(D),
          "encoder.encoder_pos_embed": r(1, k + n, D), "encoder.norm.weight": 1 + r(D), "encoder.norm.bias": r(D),
          "encoder_to_output.weight": r(P * P * C, D), "encoder_to_output.bias": r(P * P * C)}
    if num_classes > 0:
        sd["encoder.label_emb.weight"] = r(num_classes, D)
        sd["encoder.uncond_embed"] = r(1, D)
    blocks = ["encoder.in_blocks.0", "encoder.mid_block", "encoder.out_blocks.0"]
    for b in blocks:
        sd.update({f"{b}.norm1.weight": 1 + r(D), f"{b}.norm1.bias": r(D), f"{b}.attn.qkv.weight": r(3 * D, D),
                   f"{b}.attn.proj.weight": r(D, D), f"{b}.attn.proj.bias": r(D), f"{b}.norm2.weight": 1 + r(D),
                   f"{b}.norm2.bias": r(D), f"{b}.mlp.fc1.weight": r(4 * D, D), f"{b}.mlp.fc1.bias": r(4 * D),
                   f"{b}.mlp.fc2.weight": r(D, 4 * D), f"{b}.mlp.fc2.bias": r(D)})
        if qkv_bias:
            sd[f"{b}.attn.q_bias"], sd[f"{b}.attn.v_bias"] = r(D), r(D)
    sd["encoder.out_blocks.0.skip_linear.weight"], sd["encoder.out_blocks.0.skip_linear.bias"] = r(D, 2 * D), r(D)
    return sd


def reference_forward(sd: dict, x, t, y=None):
    """The reference MaskedUViT forward (no mask), restated with torch.nn.functional in float64."""
    B = x.shape[0]
    h = F.conv2d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2)  # (B, N, D), timm PatchEmbed
    half = D // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)  # float32, as theirs
    args = t[:, None].float() * freqs[None]
    time = torch.cat([torch.cos(args), torch.sin(args)], -1).double()[:, None]
    h = torch.cat([time, h], 1)
    if "encoder.label_emb.weight" in sd:
        lab = sd["encoder.uncond_embed"].expand(B, -1) if y is None else sd["encoder.label_emb.weight"][y]
        h = torch.cat([lab[:, None], h], 1)  # the class token before the time token
    h = h + sd["encoder.encoder_pos_embed"]

    def block(name, h, skip=None):
        p = lambda s: sd[f"{name}.{s}"]
        if skip is not None:
            h = F.linear(torch.cat([h, skip], -1), p("skip_linear.weight"), p("skip_linear.bias"))
        a = F.layer_norm(h, (D,), p("norm1.weight"), p("norm1.bias"))
        bias = None
        if f"{name}.attn.q_bias" in sd:
            bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        qkv = F.linear(a, p("attn.qkv.weight"), bias).reshape(B, -1, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = ((q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = h + F.linear((att @ v).transpose(1, 2).reshape(B, -1, D), p("attn.proj.weight"), p("attn.proj.bias"))
        m = F.layer_norm(h, (D,), p("norm2.weight"), p("norm2.bias"))
        m = F.linear(F.gelu(F.linear(m, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                     p("mlp.fc2.bias"))
        return h + m

    skip = block("encoder.in_blocks.0", h)
    h = block("encoder.mid_block", skip)
    h = block("encoder.out_blocks.0", h, skip)
    h = F.layer_norm(h, (D,), sd["encoder.norm.weight"], sd["encoder.norm.bias"])
    out = F.linear(h, sd["encoder_to_output.weight"], sd["encoder_to_output.bias"])
    k = sd["encoder.encoder_pos_embed"].shape[1] - (IMG // P) ** 2
    n = IMG // P
    return out[:, k:].reshape(B, n, n, P, P, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, IMG, IMG)  # unpatchify


def ours(num_classes=0, qkv_bias=False) -> MaskedViT:
    return MaskedViT(IMG, P, C, embed_dim=D, depth=DEPTH, num_heads=HEADS, qkv_bias=qkv_bias,
                     num_classes=num_classes).double().eval()


def test_patch_embedding_equals_their_conv_exactly():
    """Integer-valued weights and pixels: every product and partial sum is an exact float64 integer, so the conv
    and the converted linear must agree bit for bit, whatever their summation order."""
    g = torch.Generator().manual_seed(1)
    sd = reference_state_dict()
    sd["encoder.patch_embed.proj.weight"] = torch.randint(-8, 9, (D, C, P, P), generator=g).double()
    sd["encoder.patch_embed.proj.bias"] = torch.randint(-8, 9, (D,), generator=g).double()
    x = torch.randint(-128, 128, (2, C, IMG, IMG), generator=g).double()
    conv = F.conv2d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=P)
    conv = conv.flatten(2).transpose(1, 2)  # (B, N, D)
    new = convert_state_dict(sd)
    tokens = x.reshape(2, C, IMG // P, P, IMG // P, P).permute(0, 2, 4, 3, 5, 1).reshape(2, -1, P * P * C)  # (p1 p2 c)
    assert torch.equal(F.linear(tokens, new["patch_embed.weight"], new["patch_embed.bias"]), conv)
    m = ours()
    m.load_state_dict(new)
    assert torch.equal(m.patch_embed(tokens), conv)


@pytest.mark.parametrize("num_classes,qkv_bias", [(0, False), (0, True), (5, False)])
def test_converted_model_matches_the_reference_forward(num_classes, qkv_bias):
    sd = reference_state_dict(num_classes, qkv_bias)
    m = ours(num_classes, qkv_bias)
    m.load_state_dict(convert_state_dict(sd))  # strict: every name and shape matches
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, C, IMG, IMG, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([1, 4, 0]) if num_classes else None
    want = reference_forward(sd, x, t, y)
    got = m(x, t, y=y)
    # float64 both sides, different op order: differences are rounding noise, ~1e-15 relative
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if num_classes:  # no label: the reference's uncond_embed is our last label row
        torch.testing.assert_close(m(x, t), reference_forward(sd, x, t, None), rtol=1e-10, atol=1e-10)


def test_unknown_or_missing_keys_are_named():
    sd = reference_state_dict()
    sd["encoder.decoder_blocks.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="decoder_blocks"):
        convert_state_dict(sd)
    sd = reference_state_dict()
    del sd["encoder.patch_embed.proj.bias"]
    with pytest.raises(ValueError, match="missing key 'encoder.patch_embed.proj.bias'"):
        convert_state_dict(sd)


def _reference_checkpoint(path, step=1234):
    online, ema = reference_state_dict(seed=0), reference_state_dict(seed=1)
    buffers = {"betas": torch.linspace(1e-4, 0.02, 10, dtype=torch.float64)}
    obj = {"step": step, "model": {**{f"model.{k}": v.float() for k, v in online.items()}, **buffers},
           "ema": {"initted": torch.tensor(True), "step": torch.tensor(step),
                   **{f"ema_model.model.{k}": v.float() for k, v in ema.items()},
                   **{f"online_model.model.{k}": v.float() for k, v in online.items()},
                   **{f"ema_model.{k}": v for k, v in buffers.items()}},
           "opt": {"state": {}, "param_groups": []}, "scaler": None}
    torch.save(obj, path)
    return online, ema


def test_split_reference_checkpoint(tmp_path):
    online, ema = _reference_checkpoint(tmp_path / "model-1.pt")
    a, b, step = split_reference_checkpoint(torch.load(tmp_path / "model-1.pt", weights_only=True))
    assert step == 1234 and set(a) == set(online) and torch.equal(b["encoder.norm.bias"], ema["encoder.norm.bias"].float())
    with pytest.raises(ValueError, match="neither a reference checkpoint"):
        split_reference_checkpoint({"foo": 1}, "x.pt")


def test_import_writes_a_run_folder_that_sampling_eval_and_init_from_read(tmp_path):
    import yaml

    from maskdm import checkpoint as ckpt_io
    from maskdm.cli import main as cli_main
    from maskdm.sample import generate, load_for_sampling

    online, ema = _reference_checkpoint(tmp_path / "model-1.pt")
    cfg = {"model": {"name": "uvit-tiny", "patch_size": P, "embed_dim": D, "depth": DEPTH, "num_heads": HEADS},
           "data": {"dataset": "folder", "root": str(tmp_path), "image_size": IMG},
           "stages": [{"name": "finetune", "steps": 10, "batch_size": 2}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    ck = import_reference(tmp_path / "model-1.pt", tmp_path / "cfg.yaml", run, log=lambda *a: None)
    assert ck == ckpt_io.find_checkpoint(run) and ck.name == "ckpt-00001234"
    assert ckpt_io.verify_checkpoint(ck) is None
    for which, ref in (("ema", ema), ("online", online)):
        model, diffusion, loaded = load_for_sampling(run, which)  # what `maskdm sample` / `eval` do
        want = convert_state_dict({k: v.float() for k, v in ref.items()})
        assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
    assert loaded.train.out_dir == str(run)
    x = generate(model, diffusion, 2, steps=2, batch_size=2)
    assert x.shape == (2, C, IMG, IMG) and torch.isfinite(x).all()
    init = ckpt_io.load_weights(run, "ema")  # train.init_from=<run> reads this
    assert torch.equal(init["head.weight"], ema["encoder_to_output.weight"].float())
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        import_reference(tmp_path / "model-1.pt", tmp_path / "cfg.yaml", run, log=lambda *a: None)
    # through the CLI, and a config whose model does not fit: one line naming the key and shapes
    rc = cli_main(["import-ref", str(tmp_path / "model-1.pt"), "--config", str(tmp_path / "cfg.yaml"), "--out",
                   str(tmp_path / "run2")])
    assert rc == 0 and ckpt_io.find_checkpoint(tmp_path / "run2").name == "ckpt-00001234"
    torch.save({"model": {f"model.{k}": v for k, v in reference_state_dict(qkv_bias=True).items()}},
               tmp_path / "qv.pt")
    with pytest.raises(ValueError, match="model.qkv_bias=true"):
        import_reference(tmp_path / "qv.pt", tmp_path / "cfg.yaml", tmp_path / "run4", log=lambda *a: None)
    path = import_reference(tmp_path / "qv.pt", tmp_path / "cfg.yaml", tmp_path / "run4", ["model.qkv_bias=true"],
                            log=lambda *a: None)
    assert ckpt_io.load_weights(path, "ema")["in_blocks.0.attn.qkv.bias"].shape == (3 * D,)  # EMA = online here
    with pytest.raises(Exception, match="does not fit this model"):
        import_reference(tmp_path / "model-1.pt", tmp_path / "cfg.yaml", tmp_path / "run3", ["model.embed_dim=64"],
                         log=lambda *a: None)
