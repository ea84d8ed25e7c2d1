"""Config loading: every shipped config is valid; bad keys and values fail naming the key and allowed values."""

from pathlib import Path

import pytest

from maskdm.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.total_steps > 0


def test_paper_settings():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "celebahq256_b_pretrain90.yaml")
    (s,) = cfg.stages
    assert (cfg.model.name, cfg.model.patch_size, cfg.data.image_size) == ("uvit-b", 4, 256)
    assert (s.mask, s.mask_ratio, s.block_size, s.batch_size, s.lr) == ("block", 0.9, 4, 256, 2e-4)
    assert (s.betas, s.weight_decay, s.warmup_steps, s.ema_decay, s.grad_clip) == ((0.99, 0.99), 0.03, 0, 0.999, 1.0)
    assert cfg.diffusion.schedule == "cosine"
    ft = load_config(Path(__file__).parent.parent / "configs" / "celebahq256_b_finetune.yaml")
    assert ft.stages[0].lr == 1e-5 and ft.stages[0].mask == "none" and ft.train.init_weights == "online"
    assert ft.train.init_from
    tr = load_config(Path(__file__).parent.parent / "configs" / "celebahq_s_finetune_10pct.yaml")
    assert tr.data.subset == pytest.approx(0.1) and tr.data.hflip == 0.5 and tr.stages[0].lr == 5e-5


def test_quick_config_is_masked_then_full():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "fashion_mnist_quick.yaml")
    assert cfg.model.name == "uvit-tiny" and cfg.data.image_size == 32 and cfg.data.dataset == "fashion_mnist"
    assert cfg.stages[0].mask == "block" and cfg.eval.baseline_untrained
    assert [s.mask != "none" for s in cfg.stages] == [True, False]
    assert cfg.eval.enabled


def test_overrides_by_index_and_name():
    cfg = load_config(None, ["stages.0.steps=5", "stages.train.lr=2e-4", "train.seed=3", "data.hflip=0.5",
                             "stages.0.mask=random", "stages.0.mask_ratio=[0.5, 0.9]", "stages.0.betas=[0.9, 0.99]",
                             "train.init_from=null"])
    s = cfg.stages[0]
    assert (s.steps, s.lr, s.mask, s.mask_ratio, s.betas) == (5, 2e-4, "random", (0.5, 0.9), (0.9, 0.99))
    assert cfg.train.seed == 3 and cfg.data.hflip == 0.5 and cfg.train.init_from is None


def test_yaml_float_strings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stages:\n  - {name: a, steps: 3, lr: 2e-4}\n  - {name: b, steps: 2, lr: 1e-5}\n")
    cfg = load_config(p)
    assert [s.lr for s in cfg.stages] == [2e-4, 1e-5]
    assert cfg.stage_start(1) == 3 and cfg.total_steps == 5


@pytest.mark.parametrize("overrides, needles", [
    (["train.sed=1"], ["train.sed", "did you mean 'seed'", "allowed keys"]),
    (["stages.0.mask=blok"], ["stages[0].mask", "none, random, block, crop"]),
    (["stages.nope.steps=1"], ["stages.nope", "no entry of stages named 'nope'"]),
    (["data.subset=2"], ["data.subset", "(0, 1]"]),
    (["train.seed=abc"], ["train.seed", "integer"]),
    (["stages.0.mask=block", "stages.0.block_size=3"], ["stages[0].block_size", "divides the patch grid 16x16"]),
    (["model.name=foo"], ["model.name", "uvit-tiny, uvit-s, uvit-b"]),
    (["eval.enabled=true", "eval.steps=2000"], ["eval.steps", "[1, 1000]"]),
    (["stages.0.mask_ratio=[0.9, 0.5]"], ["stages[0].mask_ratio", "low <= high"]),
    (["data.dataset=folder"], ["data.root", "required"]),
    (["data.dataset=imagenet"], ["data.dataset", "fashion_mnist, folder"]),
    (["train.precision=fp16"], ["train.precision", "auto, bf16, fp32"]),
    (["eval.enabled=true", "eval.backbone=inception"], ["eval.inception_weights"]),
    (["stages.0.mask=crop", "stages.0.crop_size=17"], ["stages[0].crop_size", "[1, 16]"]),
    (["stages.0.mask_ratio=1.0"], ["stages[0].mask_ratio", "[0, 1)"]),
    (["train"], ["dotted.key=value"]),
    (["stages.0.lr=.nan"], ["stages[0].lr", "finite"]),
    (["stages.0.lr=nan"], ["stages[0].lr", "finite"]),
    (["stages.0.ema_decay=.inf"], ["stages[0].ema_decay", "finite"]),
    (["stages.0.max_minutes=inf"], ["stages[0].max_minutes", "finite"]),
    (["stages.0.mask_ratio=[0.5, .nan]"], ["stages[0].mask_ratio[1]", "finite"]),
    (["diffusion.min_snr_gamma=-.inf"], ["diffusion.min_snr_gamma", "finite"]),
    (["train.seed.x=1"], ["train.seed is a value"]),
])
def test_errors_name_the_key(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name: uvit-tiny}\nstages:\n  - {name: a, stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.stepz.*did you mean 'steps'"):
        load_config(p)
    p.write_text("modle: {}\n")
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip():
    cfg = load_config(None, ["stages.0.mask_ratio=[0.5, 0.9]", "stages.0.mask=random"])
    from maskdm.config import config_from_dict

    assert config_from_dict(cfg.to_dict()) == cfg
