"""Every paper config against the reference file it follows (jiachenlei/maskdm @ 0e79a60), item by item.

The table is read off the reference YAML files (base.yml supplies what a file leaves out: warmup_steps 0,
clip_grad null = no clipping); their encoder_depth 12 (B) / 13 (small) both build 6 + 1 + 6 = 13 blocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from maskdm.config import load_config

CONFIGS = Path(__file__).parent.parent / "configs"

# file: (reference file, model, image, schedule, batch, lr, warm-up, grad clip, EMA decay, mask, ratio, block / crop,
#        hflip, subset)
C64 = ("uvit-s", 64, "linear", 256, 2e-4, 0, 0.0, 0.999)
TABLE = {
    **{f"celeba64_s_pretrain_{k}_{r}.yaml": (f"configs/ablation/pretrain/{k}/celeba_{r}p.yml", *C64,
                                             "random" if k == "patch" else "block", r / 100,
                                             None if k == "patch" else int(k[5:]), 0.0, 1.0)
       for k, rs in (("patch", (10, 50, 90)), ("block2", (10, 50, 90)), ("block4", (10, 50, 90)), ("block8", (50,)))
       for r in rs},
    **{f"celeba64_s_pretrain_crop_{r}.yaml": (f"configs/ablation/pretrain/crop/celeba_{r}p.yml", *C64, "crop", None,
                                              c, 0.0, 1.0) for r, c in ((10, 15), (50, 11), (90, 5))},
    "celeba64_s_finetune.yaml": ("configs/ablation/celeba_small.yml", "uvit-s", 64, "linear", 128, 2e-4, 0, 0.0,
                                 0.999, "none", None, None, 0.0, 1.0),
    "celeba64_s_ddpm.yaml": ("configs/ablation/celeba_small.yml", "uvit-s", 64, "linear", 128, 2e-4, 0, 0.0, 0.999,
                             "none", None, None, 0.0, 1.0),
    "celebahq256_b_pretrain90.yaml": ("configs/celebahq_base_90p.yml", "uvit-b", 256, "cosine", 256, 2e-4, 0, 1.0,
                                      0.999, "block", 0.9, 4, 0.0, 1.0),
    "celebahq256_b_pretrain50.yaml": ("configs/celebahq_base_50p.yml", "uvit-b", 256, "cosine", 64, 2e-4, 5000, 1.0,
                                      0.999, "block", 0.5, 4, 0.0, 1.0),
    "celebahq256_b_finetune.yaml": ("configs/celebahq_base.yml", "uvit-b", 256, "cosine", 32, 1e-5, 5000, 1.0, 0.999,
                                    "none", None, None, 0.0, 1.0),
    "church256_b_ddpm.yaml": ("configs/church256_base.yml", "uvit-b", 256, "linear", 64, 1e-4, 5000, 1.0, 0.9999,
                              "none", None, None, 0.5, 1.0),
    "vggface2_s_pretrain90.yaml": ("configs/transfer/vggface2_small_90p.yml", "uvit-s", 256, "cosine", 256, 2e-4, 0,
                                   1.0, 0.999, "block", 0.9, 4, 0.0, 1.0),
    "celebahq256_s_pretrain90.yaml": ("configs/transfer/celebahq_small_90p.yml", "uvit-s", 256, "cosine", 256, 2e-4,
                                      0, 1.0, 0.999, "block", 0.9, 4, 0.0, 1.0),
    "celebahq_s_finetune_10pct.yaml": ("configs/transfer/celebahq_small_0.1.yml", "uvit-s", 256, "cosine", 64, 5e-5,
                                       0, 0.0, 0.999, "none", None, None, 0.5, 0.1),
    "celebahq_s_finetune_1pct.yaml": ("configs/transfer/celebahq_small_0.01.yml", "uvit-s", 256, "cosine", 64, 5e-5,
                                      0, 0.0, 0.999, "none", None, None, 0.5, 0.01),
}
FINETUNE_FROM = {"celeba64_s_finetune.yaml": "runs/celeba64_s_pretrain_block4_90",
                 "celebahq256_b_finetune.yaml": "runs/celebahq256_b_pretrain90",
                 "celebahq_s_finetune_10pct.yaml": "runs/vggface2_s_pretrain90",
                 "celebahq_s_finetune_1pct.yaml": "runs/vggface2_s_pretrain90"}


def test_every_paper_config_is_in_the_table():
    files = {p.name for p in CONFIGS.glob("*.yaml")} - {"fashion_mnist_quick.yaml"}
    assert files == set(TABLE), f"configs without a reference row: {files - set(TABLE)}; rows without a file: " \
                                f"{set(TABLE) - files}"
    assert len([f for f in TABLE if f.startswith("celeba64_s_pretrain_")]) == 13  # all 13 reference ablations


@pytest.mark.parametrize("name", sorted(TABLE))
def test_config_matches_its_reference_file(name):
    ref, model, img, sched, batch, lr, warm, clip, ema, mask, ratio, size, hflip, subset = TABLE[name]
    text = (CONFIGS / name).read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert f"reference file {ref}" in " ".join(header.replace("#", " ").split()), "the header names its reference"
    assert "bf16 autocast instead of fp16 + GradScaler" in header and "all-reduced" in header
    cfg = load_config(CONFIGS / name)
    (s,) = cfg.stages
    m = cfg.model
    assert (m.name, m.patch_size, cfg.data.image_size, cfg.diffusion.schedule) == (model, 4, img, sched)
    assert not m.qkv_bias and not m.mlp_time_embed
    assert cfg.diffusion.loss_weighting == "none" and cfg.diffusion.timesteps == 1000  # p2 gamma 0: no weighting
    assert (s.batch_size, s.lr, s.warmup_steps, s.grad_clip) == (batch, pytest.approx(lr), warm, clip)
    assert (s.betas, s.weight_decay, s.ema_decay, s.ema_schedule) == ((0.99, 0.99), 0.03, ema, "ema_pytorch")
    assert s.mask == mask and (cfg.data.hflip, cfg.data.subset) == (hflip, pytest.approx(subset))
    if mask in ("random", "block"):
        assert s.mask_ratio == pytest.approx(ratio)
    if mask == "block":
        assert s.block_size == size
    if mask == "crop":
        assert s.crop_size == size
    if name in FINETUNE_FROM:
        assert (cfg.train.init_from, cfg.train.init_weights) == (FINETUNE_FROM[name], "online")
    ev = cfg.eval
    # the paper's sampler and FID protocol, also where evaluation is off (for `maskdm eval` of those runs)
    assert (ev.steps, ev.eta, ev.ddim_grid, ev.ddim_eps, ev.precision, ev.real) == (250, 1.0, "reference", "model",
                                                                                     "fp32", "all")
    if ev.enabled:
        assert (ev.num, ev.sampler, ev.weights, ev.baseline_untrained) == (10000, "ddim", "ema", False)
    assert ev.enabled == (mask == "none"), "evaluation runs after fine-tuning / full-image training"
