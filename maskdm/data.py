"""Datasets: Fashion-MNIST from its IDX files and recursive image folders, held in memory as uint8.

Images are stored once as a uint8 tensor ``(N, C, S, S)``; a batch is turned into floats in [-1, 1] on the
training device (``to_model_range``). Data order is a pure function of ``(seed, epoch)`` through
``torch.utils.data.DistributedSampler`` (one process: ``num_replicas=1``), so a resumed run replays the
exact batches of the uninterrupted one (``BatchPlan``). Per-sample augmentation (horizontal flip) is drawn
by the training loop from its per-step generator, not here, for the same reason.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .config import DataConfig

__all__ = [
    "FASHION_MNIST_ROOT",
    "BatchPlan",
    "ImageTensorDataset",
    "build_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "make_loader",
    "to_model_range",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
_FMNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


class ImageTensorDataset(Dataset):
    """uint8 images ``(N, C, H, W)`` (a tensor or a read-only memory map); items are uint8 ``(C, H, W)``."""

    def __init__(self, images, name: str = "images"):
        self.images = images
        self.name = name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        return torch.as_tensor(np.asarray(self.images[i])) if not isinstance(self.images, Tensor) else self.images[i]

    def __getitems__(self, idx: list[int]) -> Tensor:
        """A whole batch in one indexing op (the DataLoader uses this when present)."""
        if isinstance(self.images, Tensor):
            return self.images[torch.as_tensor(idx)]
        return torch.from_numpy(np.ascontiguousarray(self.images[np.sort(idx)][np.argsort(np.argsort(idx))]))

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def to_model_range(batch: Tensor, device=None, flip: Tensor | None = None) -> Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 in [-1, 1] on ``device``; ``flip`` (bool ``(B,)``) mirrors those samples."""
    x = batch.to(device=device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if flip is not None:
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x


# ----------------------------------------------------------------------------------------------- sources
def _read_idx_images(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ValueError(f"{path}: not an IDX image file (magic {magic}, expected 2051)")
    arr = np.frombuffer(data, dtype=np.uint8, offset=16)
    if arr.size != n * rows * cols:
        raise ValueError(f"{path}: truncated IDX file ({arr.size} bytes of pixels, expected {n * rows * cols})")
    return arr.reshape(n, rows, cols)


def load_fashion_mnist(root: str | None = None, split: str = "train", image_size: int = 32,
                       resample: str = "bilinear") -> Tensor:
    """Fashion-MNIST images as uint8 ``(N, 1, S, S)``: 28x28 zero-padded to 32x32, resized (``resample``:
    bilinear or bicubic, antialiased) if ``S != 32``.

    Looks for ``{train,t10k}-images-idx3-ubyte[.gz]`` in ``root`` (default: Debian's
    ``dataset-fashion-mnist`` location, ``/usr/share/datasets/fashion-mnist``).
    """
    root_path = Path(root or FASHION_MNIST_ROOT)
    base = _FMNIST_FILES[split]
    candidates = [root_path / (base + ".gz"), root_path / base]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} images not found: looked for {candidates[0]} and {candidates[1]}. "
            f"Get them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs to "
            f"{FASHION_MNIST_ROOT}), or download the four *-ubyte.gz files of "
            f"https://github.com/zalandoresearch/fashion-mnist into a folder and set data.root=that/folder")
    arr = torch.from_numpy(_read_idx_images(path).copy())[:, None]  # (N, 1, 28, 28)
    arr = F.pad(arr, (2, 2, 2, 2))  # (N, 1, 32, 32), background 0 -> -1 in model range
    if image_size != 32:
        arr = F.interpolate(arr.float(), size=(image_size, image_size), mode=resample, antialias=True,
                            align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return arr.contiguous()


def _image_files(root: Path) -> list[Path]:
    from PIL import Image

    exts = {e.lower() for e in Image.registered_extensions()}
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _decode(path: Path, size: int, mode: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
        w, h = im.size
        scale = size / min(w, h)  # resize the short side to `size`, then center-crop
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if scale > 0.5 else 3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "maskdm"


def load_image_folder(root: str, image_size: int, channels: int = 3, cache_dir: str | None = None,
                      use_cache: bool = True):
    """Every image under ``root`` (recursive, any format PIL reads), resized (short side) and center-cropped
    to ``image_size``, as uint8 ``(N, C, S, S)``.

    Decoded once: the array is cached as ``.npy`` in ``cache_dir`` under a key of (file list, sizes, mtimes,
    size, mode) and memory-mapped on later runs (shared between DDP ranks through the page cache).
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder not found: {root_path.resolve()} (set data.root to a folder of images)")
    files = _image_files(root_path)
    if not files:
        raise FileNotFoundError(f"no images found under {root_path.resolve()} (searched recursively for the "
                                f"extensions PIL reads: .png, .jpg, .jpeg, .webp, ...)")
    mode = "L" if channels == 1 else "RGB"
    h = hashlib.sha256(f"{root_path.resolve()}|{image_size}|{mode}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root_path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = _cache_root(cache_dir) / f"folder-{h.hexdigest()[:20]}-{image_size}-{mode}.npy"
    if use_cache and cache.is_file():
        return np.load(cache, mmap_mode="r")
    arr = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    for i, p in enumerate(files):
        arr[i] = _decode(p, image_size, mode)
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, cache)  # atomic: concurrent ranks never read a half-written cache
        except OSError:
            pass  # a read-only cache location only costs the decode next time
    return arr


def _subset(n: int, fraction: float, seed: int) -> np.ndarray | None:
    """Deterministic sorted subset of ``round(fraction * n)`` indices (None: keep all)."""
    if fraction >= 1.0:
        return None
    k = max(1, round(fraction * n))
    g = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(n, generator=g)[:k].numpy())


def build_dataset(cfg: DataConfig) -> ImageTensorDataset:
    """The dataset of a config: source, size, channels and the deterministic ``subset``."""
    if cfg.dataset == "fashion_mnist":
        if cfg.channels not in (None, 1):
            raise ValueError(f"data.channels={cfg.channels}: Fashion-MNIST is grayscale (1 channel)")
        images = load_fashion_mnist(cfg.root, cfg.split, cfg.image_size, cfg.resample)
        name = f"fashion_mnist/{cfg.split}"
    else:
        images = load_image_folder(cfg.root, cfg.image_size, cfg.channels or 3, cfg.cache_dir)
        name = f"folder:{cfg.root}"
    keep = _subset(images.shape[0], cfg.subset, cfg.subset_seed)
    if keep is not None:
        images = images[torch.from_numpy(keep)] if isinstance(images, Tensor) else np.ascontiguousarray(images[keep])
        name += f" (subset {cfg.subset:g}: {len(keep)} images)"
    return ImageTensorDataset(images, name)


def parse_data_spec(spec: str, image_size: int, channels: int | None = None) -> DataConfig:
    """``--data`` of ``maskdm eval``: ``fashion_mnist[:train|test][:ROOT]``, ``folder:PATH`` or a folder path."""
    if spec.startswith("fashion_mnist"):
        parts = spec.split(":", 2)
        split = parts[1] if len(parts) > 1 and parts[1] else "train"
        if split not in ("train", "test"):
            raise ValueError(f"--data {spec!r}: split must be train or test")
        root = parts[2] if len(parts) > 2 else None
        return DataConfig(dataset="fashion_mnist", split=split, root=root, image_size=image_size)
    path = spec.removeprefix("folder:")
    return DataConfig(dataset="folder", root=path, image_size=image_size, channels=channels)


# ------------------------------------------------------------------------------------------ batch order
class BatchPlan(Sampler[list[int]]):
    """Per-rank batches of one epoch, from ``DistributedSampler`` (shuffled by ``seed + epoch``, tail dropped
    so every rank gets the same count), optionally starting at batch ``start`` (resume mid-epoch).

    With ``W`` ranks and a global batch ``G = W * b``, rank ``r``'s batch ``k`` holds the global positions
    ``k * G + r + W * j`` of the epoch's permutation: the ranks together see exactly the batch a single
    process with batch ``G`` sees, whatever ``W`` is.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.batch_size = batch_size
        self.start = 0
        if len(self) < 1:
            raise ValueError(f"dataset of {n} images is smaller than one global batch of "
                             f"{batch_size * world_size}; lower the batch size")

    def set_position(self, epoch: int, start: int) -> None:
        self.sampler.set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return self.sampler.num_samples // self.batch_size

    def __iter__(self):
        idx = list(self.sampler)
        for k in range(self.start, len(self)):
            yield idx[k * self.batch_size:(k + 1) * self.batch_size]


def _collate(batch):
    return batch if isinstance(batch, Tensor) else torch.stack(batch)


def make_loader(dataset: ImageTensorDataset, plan: BatchPlan, num_workers: int = 0, pin_memory: bool = False
                ) -> DataLoader:
    return DataLoader(dataset, batch_sampler=plan, num_workers=num_workers, collate_fn=_collate,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)


def infinite_batches(dataset: ImageTensorDataset, plan: BatchPlan, first_step: int, num_workers: int = 0,
                     pin_memory: bool = False):
    """Yield ``(step, uint8 batch)`` from local step ``first_step`` on, epoch after epoch; the position in the
    data is a pure function of the step (epoch = step // steps_per_epoch)."""
    loader = make_loader(dataset, plan, num_workers, pin_memory)
    per_epoch = len(plan)
    step = first_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        plan.set_position(epoch, offset)
        for batch in loader:
            yield step, batch
            step += 1
