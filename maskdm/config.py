"""Run configuration: the schema (typed dataclasses) and its cross-field validation; the generic YAML / override
engine is ``maskdm/yamlconf.py``.

    cfg = load_config("configs/fashion_mnist_quick.yaml", ["stages.pretrain.steps=100", "train.seed=1"])

Every key is checked against the dataclass fields below: an unknown key, a value of the wrong type, a
non-finite number or a value outside its allowed set raises ``ConfigError`` naming the dotted key and what is
allowed. Overrides are ``dotted.key=value`` with the value parsed as YAML (``0.5``, ``[0.5, 0.9]``, ``true``,
``null``); a stage is addressed by its index or its name (``stages.0.lr=1e-4`` or ``stages.finetune.lr=1e-4``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import yamlconf
from .yamlconf import ConfigError, build, read_yaml, to_plain

__all__ = ["Config", "ConfigError", "DataConfig", "DiffusionConfig", "EvalConfig", "ModelConfig", "StageConfig",
           "TrainConfig", "apply_overrides", "config_from_dict", "load_config"]


@dataclass
class ModelConfig:
    name: str = "uvit-tiny"  # a preset of maskdm.create_model: uvit-tiny, uvit-s, uvit-b
    patch_size: int | None = None  # None: the preset's
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    qkv_bias: bool | None = None
    mlp_time_embed: bool | None = None  # time embedding through Linear-SiLU-Linear (MaskDM's configs: false)
    # The image size and channel count come from `data` (image_size, and 1 for Fashion-MNIST).


@dataclass
class DataConfig:
    dataset: Literal["fashion_mnist", "folder"] = "fashion_mnist"
    root: str | None = None  # fashion_mnist: default /usr/share/datasets/fashion-mnist; folder: required
    split: Literal["train", "test"] = "train"  # fashion_mnist only
    image_size: int = 32  # fashion_mnist: 28x28 padded to 32x32 (then resized if not 32)
    resample: Literal["bilinear", "bicubic"] = "bilinear"  # fashion_mnist's resize when image_size != 32
    channels: int | None = None  # None: 1 for fashion_mnist, 3 for folder; folder images convert to L or RGB
    subset: float = 1.0  # deterministic fraction of the images kept (the 10%-data transfer setting)
    subset_seed: int = 0
    hflip: float = 0.0  # probability of a horizontal flip per sample
    num_workers: int = 0  # DataLoader workers
    cache_dir: str | None = None  # folder decode cache; None: $XDG_CACHE_HOME/maskdm or ~/.cache/maskdm
    decode_workers: int | None = None  # processes decoding a folder into its cache; None: min(16, CPUs)


@dataclass
class DiffusionConfig:
    schedule: Literal["cosine", "linear"] = "cosine"
    timesteps: int = 1000
    loss_weighting: Literal["none", "min_snr"] = "none"  # min_snr: per-sample weight min(SNR, gamma) / SNR
    min_snr_gamma: float = 5.0


@dataclass
class StageConfig:
    name: str = "train"
    steps: int = 1000
    batch_size: int = 64  # global, over all ranks
    lr: float = 2e-4
    warmup_steps: int = 0  # linear warm-up, then constant
    betas: tuple[float, float] = (0.99, 0.99)
    weight_decay: float = 0.03
    grad_clip: float = 1.0  # max grad norm; 0 disables
    ema_decay: float = 0.999
    # constant: ema_decay from the first step; warmup: min(ema_decay, (1 + n) / (10 + n)); ema_pytorch: the
    # reference's ema_pytorch defaults (copy for 100 steps, then 1 - (1 + k)^(-2/3) up to ema_decay). maskdm/ema.py
    ema_schedule: Literal["constant", "warmup", "ema_pytorch"] = "constant"
    mask: Literal["none", "random", "block", "crop"] = "none"
    mask_ratio: float | tuple[float, float] = 0.0  # masked fraction; (low, high): per-sample, varlen
    block_size: int = 4  # for mask=block, in patches
    crop_size: int = 0  # for mask=crop, in patches
    # Where a stage after the first starts from: the previous stage's online weights or its EMA.
    init_weights: Literal["online", "ema"] = "online"
    # Wall-clock cap: the stage ends early (checkpoint, grid, next stage) once it has run this long. Keeps a
    # demo inside a time limit on a loaded machine; the run is then no longer a pure function of the config.
    max_minutes: float | None = None
    # `maskdm compare`: this stage's share of the arm's budget; null: an equal share of what the others leave.
    budget_fraction: float | None = None


@dataclass
class TrainConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    threads: int | None = None  # torch.set_num_threads (CPU); None: PyTorch's default
    # torch.compile of the step (loss + backward) and of the sampling forward; auto: reduce-overhead on CUDA (CUDA
    # graphs), off on CPU; YAML's bare off/on (false/true) mean off/default. cuda_graph: capture the whole step
    # (with the optimizer and EMA) by torch.cuda.graph. maskdm/step.py
    compile: Literal["off", "default", "reduce-overhead", "max-autotune", "auto"] | bool = "auto"
    cuda_graph: bool = False
    init_from: str | None = None  # checkpoint dir, run dir or .safetensors to start a separate run from
    init_weights: Literal["online", "ema"] = "online"  # which weights of init_from
    log_every: int = 10
    sample_every: int = 0  # steps between sample grids; 0: only at the end of each stage
    sample_num: int = 64
    sample_steps: int = 50  # DDIM steps for the grids
    sample_eta: float = 1.0  # DDIM eta for the grids (1.0: the paper's stochastic sampler)
    ckpt_every: int = 1000  # 0: only at stage ends, on signals and at the end
    keep_last: int = 3
    tensorboard: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    enabled: bool = False  # `maskdm train` samples and evaluates at the end
    num: int = 1000  # generated images (and as many real ones)
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = 250  # DDIM steps (DDPM always uses all T)
    eta: float = 1.0
    batch_size: int = 250
    weights: Literal["ema", "online"] = "ema"
    backbone: Literal["effnet-lite0", "inception"] = "effnet-lite0"
    inception_weights: str | None = None  # FID Inception weights file (backbone=inception)
    resize: int = 224  # backbone input size
    baseline_untrained: bool = True  # also score an untrained model (same init) for reference
    grid: int = 64  # images in the final sample grid
    seed: int = 0
    # The real set: "sample" = `num` random training images (quick); "all" = the whole training set, streamed
    # through the backbone, its features cached on disk per dataset + backbone (the paper's FID protocol).
    real: Literal["all", "sample"] = "sample"
    feature_cache: str | None = None  # real-feature cache folder; None: data.cache_dir's, or ~/.cache/maskdm
    # DDIM grid and eps handling (GaussianDiffusion.ddim_sample). Our defaults: uniform (ends at t = 0, so the last
    # model call sees the least noise) + recompute (each update stays on the line through x_t and the clipped x0,
    # as guided-diffusion); the paper's code: reference + model (the paper configs set those).
    # precision: auto = bf16 autocast on GPU; fp32 = no autocast (the reference samples in fp32).
    ddim_grid: Literal["uniform", "reference"] = "uniform"
    ddim_eps: Literal["recompute", "model"] = "recompute"
    precision: Literal["auto", "fp32"] = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return to_plain(self)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_start(self, index: int) -> int:
        """Global step at which stage ``index`` begins."""
        return sum(s.steps for s in self.stages[:index])


# ------------------------------------------------------------------------------------------------ loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or start from the defaults with ``path=None``), apply ``key=value`` overrides, build
    and validate the typed config."""
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def config_from_dict(raw: dict) -> Config:
    cfg = build(Config, _migrate(raw))
    _validate(cfg)
    return cfg


def _migrate(raw: dict) -> dict:
    """Older keys in configs and checkpoints' config.json: ``ema_warmup: true`` is ``ema_schedule: warmup``."""
    stages = raw.get("stages") if isinstance(raw, dict) else None
    if not isinstance(stages, list) or not any(isinstance(s, dict) and "ema_warmup" in s for s in stages):
        return raw
    new = []
    for s in stages:
        if isinstance(s, dict) and "ema_warmup" in s:
            s = dict(s)
            if s.pop("ema_warmup") is True:
                s.setdefault("ema_schedule", "warmup")
        new.append(s)
    return {**raw, "stages": new}


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply ``dotted.key=value`` overrides to a raw config dict (a copy is returned)."""
    return yamlconf.apply_overrides(raw, overrides, Config)


# --------------------------------------------------------------------------------------------- validation
def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed; expected {expected}")


def _validate(cfg: Config) -> None:
    from .model import PRESETS  # the registry of model presets

    m, d, df, tr, ev = cfg.model, cfg.data, cfg.diffusion, cfg.train, cfg.eval
    _check(m.name in PRESETS, "model.name", m.name, "one of " + ", ".join(PRESETS))
    for k in ("patch_size", "embed_dim", "depth", "num_heads"):
        v = getattr(m, k)
        _check(v is None or v > 0, f"model.{k}", v, "a positive integer or null (the preset's)")
    _check(m.mlp_ratio is None or m.mlp_ratio > 0, "model.mlp_ratio", m.mlp_ratio, "a positive number or null")
    p = m.patch_size or PRESETS[m.name]["patch_size"]
    _check(d.image_size > 0 and d.image_size % p == 0, "data.image_size", d.image_size,
           f"a positive multiple of the patch size {p}")
    _check(d.channels in (None, 1, 3), "data.channels", d.channels, "1, 3 or null")
    _check(0.0 < d.subset <= 1.0, "data.subset", d.subset, "a fraction in (0, 1]")
    _check(0.0 <= d.hflip <= 1.0, "data.hflip", d.hflip, "a probability in [0, 1]")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    _check(d.decode_workers is None or d.decode_workers >= 1, "data.decode_workers", d.decode_workers,
           "an integer >= 1 or null")
    if d.dataset == "folder":
        _check(bool(d.root), "data.root", d.root, "the image folder (required for dataset: folder)")
    _check(df.timesteps >= 2, "diffusion.timesteps", df.timesteps, "an integer >= 2")
    _check(df.min_snr_gamma > 0, "diffusion.min_snr_gamma", df.min_snr_gamma, "a positive number")

    grid = d.image_size // p
    names = [s.name for s in cfg.stages]
    for i, s in enumerate(cfg.stages):
        k = f"stages[{i}]"
        _check(bool(s.name) and names.count(s.name) == 1, f"{k}.name", s.name, "a non-empty name unique among stages")
        _check(s.steps >= 0, f"{k}.steps", s.steps, "an integer >= 0")
        _check(s.batch_size >= 1, f"{k}.batch_size", s.batch_size, "an integer >= 1 (the global batch)")
        _check(s.lr > 0, f"{k}.lr", s.lr, "a positive number")
        _check(s.warmup_steps >= 0, f"{k}.warmup_steps", s.warmup_steps, "an integer >= 0")
        _check(all(0.0 <= b < 1.0 for b in s.betas), f"{k}.betas", list(s.betas), "two numbers in [0, 1)")
        _check(s.weight_decay >= 0, f"{k}.weight_decay", s.weight_decay, "a number >= 0")
        _check(s.grad_clip >= 0, f"{k}.grad_clip", s.grad_clip, "a number >= 0 (0 disables clipping)")
        _check(0.0 <= s.ema_decay < 1.0, f"{k}.ema_decay", s.ema_decay, "a number in [0, 1)")
        _check(s.max_minutes is None or s.max_minutes > 0, f"{k}.max_minutes", s.max_minutes,
               "a positive number or null")
        _check(s.budget_fraction is None or 0.0 < s.budget_fraction <= 1.0, f"{k}.budget_fraction",
               s.budget_fraction, "a fraction in (0, 1] or null")
        ratios = s.mask_ratio if isinstance(s.mask_ratio, tuple) else (s.mask_ratio,)
        _check(all(0.0 <= r < 1.0 for r in ratios) and ratios[0] <= ratios[-1], f"{k}.mask_ratio", s.mask_ratio,
               "a masked fraction in [0, 1) or a [low, high] pair with low <= high")
        if s.mask == "block":
            _check(s.block_size >= 1 and grid % s.block_size == 0, f"{k}.block_size", s.block_size,
                   f"a block size in patches that divides the patch grid {grid}x{grid}")
        if s.mask == "crop":
            _check(1 <= s.crop_size <= grid, f"{k}.crop_size", s.crop_size,
                   f"a window size in patches in [1, {grid}] (the patch grid)")
    _check(cfg.total_steps >= 1, "stages", [s.steps for s in cfg.stages], "at least one step over all stages")

    for k in ("log_every", "sample_num", "sample_steps", "keep_last"):
        _check(getattr(tr, k) >= 1, f"train.{k}", getattr(tr, k), "an integer >= 1")
    for k in ("sample_every", "ckpt_every"):
        _check(getattr(tr, k) >= 0, f"train.{k}", getattr(tr, k), "an integer >= 0 (0: at stage ends only)")
    _check(tr.sample_steps <= df.timesteps, "train.sample_steps", tr.sample_steps,
           f"at most diffusion.timesteps={df.timesteps}")
    _check(tr.sample_eta >= 0, "train.sample_eta", tr.sample_eta, "a number >= 0")
    _check(tr.threads is None or tr.threads >= 1, "train.threads", tr.threads, "an integer >= 1 or null")
    _check(not tr.cuda_graph or tr.compile in ("auto", "off", "default", False, True), "train.compile", tr.compile,
           "off, default or auto with train.cuda_graph=true (reduce-overhead and max-autotune capture graphs themselves)")
    _check(not tr.cuda_graph or tr.device != "cpu", "train.cuda_graph", tr.cuda_graph, "false with train.device=cpu")
    _check(bool(tr.out_dir), "train.out_dir", tr.out_dir, "a directory path")

    if not ev.enabled:  # only `maskdm train`'s final evaluation reads this section
        return
    _check(ev.num >= 2, "eval.num", ev.num, "an integer >= 2 (FID needs two samples)")
    _check(1 <= ev.steps <= df.timesteps, "eval.steps", ev.steps, f"an integer in [1, {df.timesteps}]")
    _check(ev.eta >= 0, "eval.eta", ev.eta, "a number >= 0")
    _check(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, "an integer >= 1")
    _check(ev.resize >= 32, "eval.resize", ev.resize, "an integer >= 32 (backbone input size)")
    _check(ev.grid >= 1, "eval.grid", ev.grid, "an integer >= 1")
    if ev.backbone == "inception":
        _check(bool(ev.inception_weights), "eval.inception_weights", ev.inception_weights,
               "the path of the FID Inception weights file (needed for backbone: inception)")
