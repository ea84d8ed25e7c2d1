"""Data: the Fashion-MNIST IDX reader, image folders (recursive, resize + center-crop, cached), subsets, and
the batch order that makes resume exact and DDP equal to one process."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdm import data as D
from maskdm.config import DataConfig


def write_fake_fashion_mnist(root, n_train: int = 64, n_test: int = 16, seed: int = 0):
    """Write IDX files shaped like Fashion-MNIST's (28x28 uint8): a bright rectangle of random size per image."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train-images-idx3-ubyte.gz", n_train), ("t10k-images-idx3-ubyte.gz", n_test)):
        imgs = np.zeros((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            h, w = rng.integers(8, 24, size=2)
            top, left = (28 - h) // 2, (28 - w) // 2
            imgs[i, top:top + h, left:left + w] = rng.integers(120, 256)
        with gzip.open(root / name, "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + imgs.tobytes())
    return root


def test_fashion_mnist_idx(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "fm", n_train=10, n_test=4)
    x = D.load_fashion_mnist(str(root), "train", 32)
    assert x.shape == (10, 1, 32, 32) and x.dtype == torch.uint8
    assert (x[:, :, :2] == 0).all() and (x[:, :, :, -2:] == 0).all()  # the 2-pixel padding
    assert x.max() > 100
    assert D.load_fashion_mnist(str(root), "test", 16).shape == (4, 1, 16, 16)
    ds = D.build_dataset(DataConfig(root=str(root), image_size=32))
    assert len(ds) == 10 and ds.channels == 1 and ds.image_size == 32
    y = D.to_model_range(ds.__getitems__([0, 1]))
    assert y.min() == -1.0 and y.max() <= 1.0 and y.dtype == torch.float32


@pytest.mark.skipif(not (D.Path(D.FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split():
    x = D.load_fashion_mnist(None, "test")
    assert x.shape == (10000, 1, 32, 32)


def test_missing_fashion_mnist_names_path_and_package(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.load_fashion_mnist(str(tmp_path / "nowhere"), "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg


def test_bad_idx_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2049, 1, 28, 28) + bytes(784))
    with pytest.raises(ValueError, match="not an IDX image file"):
        D.load_fashion_mnist(str(tmp_path), "train")


def _image_folder(root):
    from PIL import Image

    (root / "a" / "b").mkdir(parents=True)
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = (255, 0, 0)  # a red center square in a wide black image
    Image.fromarray(wide).save(root / "wide.png")
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(root / "a" / "gray.jpg", quality=95)
    Image.fromarray(np.full((50, 16), 90, np.uint8), mode="L").save(root / "a" / "b" / "tall.bmp")
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_recursive_resize_crop_cache(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    arr = D.load_image_folder(str(root), 8, channels=3, cache_dir=str(cache))
    assert arr.shape == (3, 3, 8, 8) and arr.dtype == np.uint8
    # sorted by relative path: a/b/tall.bmp, a/gray.jpg, wide.png
    assert np.abs(arr[1].astype(int) - 200).max() <= 3
    assert arr[2, 0].min() > 200 and arr[2, 1].max() < 40  # center crop of the wide image: all red
    assert len(list(cache.glob("*.npy"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(D, "_decode", boom)
    again = D.load_image_folder(str(root), 8, channels=3, cache_dir=str(cache))
    assert isinstance(again, np.memmap) and np.array_equal(np.asarray(again), arr)
    ds = D.build_dataset(DataConfig(dataset="folder", root=str(root), image_size=8, cache_dir=str(cache)))
    assert ds.__getitems__([2, 0]).shape == (2, 3, 8, 8)
    assert torch.equal(ds.__getitems__([2, 0])[0], torch.from_numpy(np.array(arr[2])))
    monkeypatch.undo()
    gray = D.load_image_folder(str(root), 8, channels=1, cache_dir=str(cache), use_cache=False)
    assert gray.shape == (3, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        D.load_image_folder(str(tmp_path / "missing"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        D.load_image_folder(str(tmp_path / "empty"), 8)


def _many_images(root, n=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"d{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12 + i % 5, 10, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    return root


def test_parallel_decode_equals_in_process_and_leaves_only_the_cache(tmp_path):
    root = _many_images(tmp_path / "imgs", 150)  # 3 chunks of 64: the pool path with 2 workers
    one = D.load_image_folder(str(root), 8, cache_dir=str(tmp_path / "c1"), workers=1)
    two = D.load_image_folder(str(root), 8, cache_dir=str(tmp_path / "c2"), workers=2)
    assert isinstance(two, np.memmap) and two.shape == (150, 3, 8, 8) and np.array_equal(one, two)
    assert [p.name for p in (tmp_path / "c2").iterdir()] == [Path(two.filename).name]  # no temporaries left
    tmp = D.load_image_folder(str(root), 8, use_cache=False, workers=2)
    assert np.array_equal(tmp, one) and not Path(tmp.filename).exists()  # unlinked, still mapped


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_image_names_the_file_and_leaves_no_cache(tmp_path, workers):
    root = _many_images(tmp_path / "imgs", 150)
    bad = root / "d1" / "070.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"cannot decode image .*d1/070\.png"):
        D.load_image_folder(str(root), 8, cache_dir=str(cache), workers=workers)
    assert list(cache.iterdir()) == []  # neither a cache nor a temporary that could later read as valid


def test_stale_temporary_of_a_dead_decode_is_swept_and_never_read(tmp_path):
    root = _many_images(tmp_path / "imgs", 5)
    cache = tmp_path / "cache"
    first = D.load_image_folder(str(root), 8, cache_dir=str(cache))
    final = Path(first.filename)
    final.unlink()
    dead = 2 ** 22 + 12345  # above the default pid_max of 32768 / 4194304: no such process
    stale = final.with_name(f".{final.name}.{dead}.tmp")
    stale.write_bytes(b"half a cache")
    again = D.load_image_folder(str(root), 8, cache_dir=str(cache))
    assert np.array_equal(again, first) and not stale.exists()


def test_ddp_ranks_share_one_decode(tmp_path, monkeypatch):
    import threading

    root = _many_images(tmp_path / "imgs", 5)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(D, "_decode", lambda *a: (_ for _ in ()).throw(AssertionError("rank 1 decoded")))
    got = {}
    waiter = threading.Thread(target=lambda: got.update(arr=D.load_image_folder(str(root), 8, cache_dir=str(cache))))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive()  # rank 1 waits for local rank 0's cache
    monkeypatch.undo()
    ref = D.load_image_folder(str(root), 8, cache_dir=str(cache))  # "rank 0" decodes
    waiter.join(10)
    assert not waiter.is_alive() and np.array_equal(got["arr"], ref)
    # a failed decode on rank 0 is reported on the waiting ranks instead of a hang
    other = tmp_path / "other"
    _many_images(other, 3)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    (other / "d0" / "000.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="000.png"):
        D.load_image_folder(str(other), 8, cache_dir=str(cache))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match="decoding rank failed: cannot decode image .*000.png"):
        D.load_image_folder(str(other), 8, cache_dir=str(cache))


def test_unwritable_cache_and_full_disk(tmp_path, monkeypatch):
    import errno

    root = _many_images(tmp_path / "imgs", 5)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a waiting rank must not wait for a cache nobody can write
    with pytest.warns(UserWarning, match="not writable"):
        arr = D.load_image_folder(str(root), 8, cache_dir=str(blocker / "cache"))
    assert arr.shape == (5, 3, 8, 8) and not Path(arr.filename).exists()
    monkeypatch.setenv("LOCAL_RANK", "0")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(D.os, "pwrite", full)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match=r"writing the folder cache .*\.tmp failed: No space left on device"):
        D.load_image_folder(str(root), 8, cache_dir=str(cache), workers=1)
    assert list(cache.iterdir()) == []


def test_folder_subset_keeps_the_map_and_pickles_by_name(tmp_path):
    import pickle

    root = _many_images(tmp_path / "imgs", 40)
    cfg = DataConfig(dataset="folder", root=str(root), image_size=8, cache_dir=str(tmp_path / "c"), subset=0.25)
    ds = D.build_dataset(cfg)
    full = D.load_image_folder(str(root), 8, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 10 and isinstance(ds.images, np.memmap) and ds.images.shape[0] == 40
    keep = ds.indices
    batch = ds.__getitems__([7, 0, 3])
    assert torch.equal(batch, torch.from_numpy(np.array(full[keep[[7, 0, 3]]])))
    assert torch.equal(ds[5], torch.from_numpy(np.array(full[keep[5]])))
    blob = pickle.dumps(ds)
    assert len(blob) < 4096  # the file name, not 40 x 192 pixels
    back = pickle.loads(blob)
    assert torch.equal(back.__getitems__([7, 0, 3]), batch)


def test_subset_is_deterministic(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "fm", n_train=50)
    a = D.build_dataset(DataConfig(root=str(root), subset=0.1, subset_seed=3))
    b = D.build_dataset(DataConfig(root=str(root), subset=0.1, subset_seed=3))
    c = D.build_dataset(DataConfig(root=str(root), subset=0.1, subset_seed=4))
    assert len(a) == 5 and torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_batch_plan_ranks_partition_the_global_batch():
    n, G = 37, 8
    single = D.BatchPlan(n, G, seed=5)
    assert len(single) == n // G
    ranks = [D.BatchPlan(n, G // 2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert all(len(r) == len(single) for r in ranks)
    for epoch in (0, 3):
        single.set_position(epoch, 0)
        for r in ranks:
            r.set_position(epoch, 0)
        for k, (g, r0, r1) in enumerate(zip(single, *ranks)):
            assert r0 == g[0::2] and r1 == g[1::2], (epoch, k)
    single.set_position(1, 0)
    full = list(single)
    single.set_position(1, 2)
    assert list(single) == full[2:]  # resume mid-epoch
    with pytest.raises(ValueError, match="smaller than one global batch"):
        D.BatchPlan(5, 8, seed=0)


def test_infinite_batches_position_is_a_function_of_step(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "fm", n_train=20)
    ds = D.build_dataset(DataConfig(root=str(root)))
    plan = D.BatchPlan(len(ds), 4, seed=1)
    it = D.infinite_batches(ds, plan, 0)
    run = [next(it) for _ in range(12)]  # crosses two epoch boundaries (5 batches per epoch)
    it.close()
    it = D.infinite_batches(ds, D.BatchPlan(len(ds), 4, seed=1), 7)
    resumed = [next(it) for _ in range(5)]
    it.close()
    for (s1, b1), (s2, b2) in zip(run[7:], resumed):
        assert s1 == s2 and torch.equal(b1, b2)


def test_flip_and_workers(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "fm", n_train=16)
    ds = D.build_dataset(DataConfig(root=str(root)))
    b = ds.__getitems__([0, 1])
    y = D.to_model_range(b, flip=torch.tensor([True, False]))
    assert torch.equal(y[0], D.to_model_range(b[:1])[0].flip(-1)) and torch.equal(y[1], D.to_model_range(b[1:2])[0])
    plan = D.BatchPlan(len(ds), 4, seed=0)
    plan.set_position(0, 0)
    direct = [ds.__getitems__(i) for i in plan]
    with_workers = list(D.make_loader(ds, plan, num_workers=1))
    assert all(torch.equal(a, w) for a, w in zip(direct, with_workers))


def test_parse_data_spec():
    c = D.parse_data_spec("fashion_mnist:test", 32)
    assert (c.dataset, c.split, c.root) == ("fashion_mnist", "test", None)
    c = D.parse_data_spec("fashion_mnist:train:/x/y", 32)
    assert c.root == "/x/y"
    c = D.parse_data_spec("folder:/imgs", 64, 3)
    assert (c.dataset, c.root, c.image_size) == ("folder", "/imgs", 64)
    assert D.parse_data_spec("/imgs", 64).root == "/imgs"
