"""Offline FID / KID with the EfficientNet-Lite0 backbone shipped on PyPI."""

import json

import numpy as np
import pytest
import torch

from maskdm.evaluate import EffNetLite0Features, FeatureMetrics, make_backbone, score_models, write_json


def _shapes(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """uint8 (n, 1, size, size) grayscale 'items': filled rectangles and ellipses of random size and level."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, 1, size, size), np.uint8)
    for i in range(n):
        h, w = g.integers(size // 4, size - 4, size=2)
        level = g.integers(100, 256)
        if i % 2:
            out[i, 0, (size - h) // 2:(size + h) // 2, (size - w) // 2:(size + w) // 2] = level
        else:
            out[i, 0][((yy - size / 2) / (h / 2)) ** 2 + ((xx - size / 2) / (w / 2)) ** 2 <= 1] = level
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def feat():
    return EffNetLite0Features(resize=64)


def _scores(feat, real, fake):
    m = FeatureMetrics(feat, kid_subset_size=16, kid_subsets=20)
    m.update(real, real=True)
    m.update(fake, real=False)
    return m.compute()


def test_fid_kid_self_near_zero_noise_large(feat):
    a, b = _shapes(48, 0), _shapes(48, 1)
    noise = torch.randint(0, 256, a.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    same = _scores(feat, a, a.clone())
    other = _scores(feat, a, b)
    vs_noise = _scores(feat, a, noise)
    assert abs(same["fid"]) < 1e-2 * other["fid"], (same, other)
    assert abs(same["kid_mean"]) < 0.05 * vs_noise["kid_mean"]
    assert vs_noise["fid"] > 3 * other["fid"] and vs_noise["fid"] > 50, (other, vs_noise)
    assert vs_noise["kid_mean"] > 3 * other["kid_mean"]
    assert same["num_real"] == 48 and same["num_fake"] == 48


def test_frechet_distance_matches_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    from maskdm.evaluate import frechet_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 64, generator=g, dtype=torch.float64), torch.randn(30, 64, generator=g, dtype=torch.float64)
    b = b @ torch.randn(64, 64, generator=g, dtype=torch.float64) * 0.3 + 0.5
    args = (a.mean(0), a.T.cov(), b.mean(0), b.T.cov())
    torch.testing.assert_close(frechet_distance(*args), _compute_fid(*args), rtol=1e-6, atol=1e-6)


def test_features_shape_memo_and_grayscale(feat):
    x = _shapes(5, 2)
    f = feat(x)
    assert f.shape == (5, EffNetLite0Features.num_features) and f.dtype == torch.float32
    assert feat(x) is f  # FID and KID share one extraction
    rgb = x.expand(-1, 3, -1, -1).contiguous()
    torch.testing.assert_close(feat(rgb), f)  # grayscale is repeated to 3 channels
    torch.testing.assert_close(feat(x.float() / 255.0), f, atol=1e-3, rtol=1e-3)  # floats in [0, 1] accepted


def test_imagenet_weights_are_loaded():
    """With the shipped weights and the TF-Lite scaling, the classifier knows a cat (offline)."""
    skdata = pytest.importorskip("skimage.data")
    m = EffNetLite0Features(resize=224)
    x = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        logits = m.net((x - 127.0) / 128.0)
    assert int(logits.argmax()) in range(281, 286)  # the ImageNet domestic-cat classes


def test_inception_needs_its_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Inception weights file"):
        make_backbone("inception", inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="effnet-lite0"):
        make_backbone("vgg")


def test_score_models_json_names_backbone(tmp_path):
    from maskdm import GaussianDiffusion, create_model

    torch.manual_seed(0)
    model = create_model("uvit-tiny", img_size=16, in_chans=1, embed_dim=32, depth=3, num_heads=2).eval()
    res = score_models({"untrained": model}, GaussianDiffusion("cosine", 100), _shapes(8, 3, 16), num=8,
                       steps=2, eta=0.0, batch_size=8, resize=64, grids={"untrained": tmp_path / "g.png"},
                       log=lambda *a: None)
    path = write_json(res, tmp_path / "r.json")
    loaded = json.loads(path.read_text())
    assert loaded["backbone"].startswith("efficientnet-lite0") and loaded["backbone_id"] == "effnet-lite0"
    r = loaded["models"]["untrained"]
    assert r["fid"] > 0 and r["num_fake"] == 8 and r["num_real"] == 8
    assert (tmp_path / "g.png").is_file()


def _tiny_model():
    from maskdm import create_model

    torch.manual_seed(0)
    return create_model("uvit-tiny", img_size=16, in_chans=1, embed_dim=32, depth=3, num_heads=2).eval()


def test_whole_training_set_as_the_real_set_streams_and_caches(tmp_path, feat, monkeypatch):
    """real: all gives the FID of the full real set (the same number as passing every image), its statistics
    cached per dataset + backbone and read back without running the backbone again."""
    from maskdm import GaussianDiffusion
    from maskdm.data import ImageTensorDataset
    from maskdm.evaluate import real_features, real_set

    images = _shapes(30, 5, 16)
    ds = ImageTensorDataset(images, "shapes")
    assert real_set(ds, "all", 8) is ds and real_set(ds, "sample", 8).shape == (8, 1, 16, 16)
    kw = {"num": 8, "steps": 2, "eta": 0.0, "batch_size": 7, "resize": 64, "log": lambda *a: None}
    d = GaussianDiffusion("cosine", 100)
    whole = score_models({"m": _tiny_model()}, d, ds, feature_cache=str(tmp_path), **kw)
    every = score_models({"m": _tiny_model()}, d, images, **kw)
    assert whole["real"] == "all" and whole["models"]["m"]["num_real"] == 30
    # same features, moments accumulated in float64 in another batching: equal to rounding
    assert whole["models"]["m"]["fid"] == pytest.approx(every["models"]["m"]["fid"], rel=1e-5)
    cached = list((tmp_path / "features").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("features-") and cached[0].name.endswith(".pt")
    stats = torch.load(cached[0], weights_only=True)
    # the same batches of 7 as the stream (the float32 backbone's rounding depends on the batch size)
    f = torch.cat([feat(images[i:i + 7].clone()) for i in range(0, 30, 7)]).double()
    torch.testing.assert_close(stats["sum"], f.sum(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats["cov_sum"], f.T @ f, rtol=1e-9, atol=1e-6)
    assert stats["n"] == 30 and stats["kid"].shape == (30, 1280)

    class NoBackbone(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the cache was not used")

    again = real_features(ds, NoBackbone(), backbone_id="effnet-lite0-64", cache_dir=tmp_path, log=lambda *a: None)
    assert torch.equal(again["sum"], stats["sum"])
    other = ImageTensorDataset(_shapes(30, 6, 16), "shapes")  # same name and size, other pixels: another key
    with pytest.raises(AssertionError, match="cache was not used"):
        real_features(other, NoBackbone(), backbone_id="effnet-lite0-64", cache_dir=tmp_path, log=lambda *a: None)


@pytest.mark.parametrize("kw,name", [({"num": 0}, "num"), ({"num": 1}, "num"), ({"batch_size": 0}, "batch_size"),
                                     ({"steps": 0}, "steps")])
def test_bad_numbers_name_the_option(kw, name):
    from maskdm import GaussianDiffusion

    args = {"num": 8, "steps": 2, "batch_size": 8, "resize": 64, "log": lambda *a: None} | kw
    with pytest.raises(ValueError, match=rf"^{name} \(--{name.replace('_', '-')} / eval.{name}\)"):
        score_models({"m": _tiny_model()}, GaussianDiffusion("cosine", 100), _shapes(8, 3, 16), **args)


def test_eval_options_from_config():
    from maskdm.config import EvalConfig
    from maskdm.evaluate import eval_options

    ev = EvalConfig(ddim_grid="reference", ddim_eps="model", precision="fp32", inception_weights="w.pth")
    o = eval_options(ev, "cuda", cache_dir="/c")
    assert (o["grid"], o["eps_mode"], o["autocast"], o["backbone"], o["feature_cache"]) == (
        "reference", "model", False, "inception", "/c")
    o = eval_options(EvalConfig(), "cuda")
    assert (o["grid"], o["eps_mode"], o["autocast"], o["backbone"]) == ("uniform", "recompute", True, "effnet-lite0")
    assert eval_options(EvalConfig(), "cpu")["autocast"] is False


def test_cli_eval_and_sample_take_the_protocol_options(tmp_path, capsys):
    """`maskdm eval --real all --ddim-grid reference --ddim-eps model --fp32` end to end on a tiny run folder, and
    --num 0 / 1 / --batch-size 0 as one line naming the option (exit 2), never a traceback."""
    import yaml
    from PIL import Image

    from maskdm.cli import main
    from maskdm.import_ref import import_reference

    from .test_import_ref import DEPTH, HEADS, IMG, D, P, _reference_checkpoint

    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)).save(data / f"{i}.png")
    _reference_checkpoint(tmp_path / "ref.pt")
    cfg = {"model": {"name": "uvit-tiny", "patch_size": P, "embed_dim": D, "depth": DEPTH, "num_heads": HEADS},
           "data": {"dataset": "folder", "root": str(data), "image_size": IMG, "cache_dir": str(tmp_path / "c")},
           "stages": [{"name": "ft", "steps": 1, "batch_size": 2}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    import_reference(tmp_path / "ref.pt", tmp_path / "cfg.yaml", run, log=lambda *a: None)
    out = tmp_path / "e.json"
    rc = main(["eval", "--ckpt", str(run), "--num", "8", "--steps", "2", "--batch-size", "4", "--resize", "64",
               "--real", "all", "--ddim-grid", "reference", "--ddim-eps", "model", "--fp32", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert (res["real"], res["ddim_grid"], res["ddim_eps"], res["precision"], res["num_real"]) == (
        "all", "reference", "model", "fp32", 12)
    assert list((tmp_path / "c" / "features").glob("features-*.pt"))  # the data cache folder holds the features
    rc = main(["sample", "--ckpt", str(run), "--num", "2", "--steps", "3", "--ddim-grid", "reference",
               "--ddim-eps", "model", "--fp32", "--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert rc == 0 and (tmp_path / "g.png").is_file()
    capsys.readouterr()
    for bad, name in ((["--num", "0"], "--num"), (["--num", "1"], "--num"), (["--batch-size", "0"], "--batch-size")):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--ckpt", str(run), *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class _PixelFeatures(torch.nn.Module):
    """A cheap deterministic 'backbone': the first 8 pixels of each image, as float32 (B, 8)."""

    num_features = 8

    def forward(self, x):
        return x.flatten(1)[:, :8].float()


def _ddp_real_features(rank, world, init, images, cache, out):
    import torch.distributed as dist

    from maskdm.data import ImageTensorDataset
    from maskdm.evaluate import real_features

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        stats = real_features(ImageTensorDataset(images, "px"), _PixelFeatures(), backbone_id="px", batch_size=3,
                              cache_dir=cache, kid_max=7, log=lambda *a: None)
        torch.save(stats, f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_real_features_sharded_over_two_gloo_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from maskdm.data import ImageTensorDataset
    from maskdm.evaluate import real_features

    images = _shapes(20, 9, 16)
    one = real_features(ImageTensorDataset(images, "px"), _PixelFeatures(), backbone_id="px", batch_size=3,
                        cache_dir=tmp_path / "single", kid_max=7, log=lambda *a: None)
    f = images.flatten(1)[:, :8].double()
    assert one["n"] == 20 and torch.equal(one["sum"], f.sum(0)) and torch.equal(one["cov_sum"], f.T @ f)
    mp.spawn(_ddp_real_features, args=(2, f"file://{tmp_path / 'pg'}", images, str(tmp_path / "ddp"),
                                       str(tmp_path / "r")), nprocs=2, join=True)
    for r in range(2):  # integer-valued features: the sharded float64 sums are exact
        got = torch.load(tmp_path / f"r-{r}.pt", weights_only=True)
        assert all(torch.equal(got[k], one[k]) for k in ("sum", "cov_sum", "kid")) and got["n"] == 20
    assert len(list((tmp_path / "ddp" / "features").glob("*.pt"))) == 1  # written once, by rank 0
