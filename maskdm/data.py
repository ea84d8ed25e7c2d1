"""Datasets: Fashion-MNIST from its IDX files and recursive image folders, held in memory as uint8.

Images are stored once as a uint8 tensor ``(N, C, S, S)``; a batch is turned into floats in [-1, 1] on the
training device (``to_model_range``). Data order is a pure function of ``(seed, epoch)`` through
``torch.utils.data.DistributedSampler`` (one process: ``num_replicas=1``), so a resumed run replays the
exact batches of the uninterrupted one (``BatchPlan``). Per-sample augmentation (horizontal flip) is drawn
by the training loop from its per-step generator, not here, for the same reason.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import struct
import tempfile
import time
import warnings
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
    """uint8 images ``(N, C, H, W)`` (a tensor or a read-only memory map); items are uint8 ``(C, H, W)``.

    ``indices`` (sorted int64) selects a subset without copying a memory-mapped array. Pickling (DataLoader
    workers under spawn) sends a memory map's file name, not its pixels.
    """

    def __init__(self, images, name: str = "images", indices: np.ndarray | None = None):
        self.images = images
        self.name = name
        self.indices = indices

    def __len__(self) -> int:
        return int(self.images.shape[0] if self.indices is None else len(self.indices))

    def __getitem__(self, i: int) -> Tensor:
        if self.indices is not None:
            i = int(self.indices[i])
        return self.images[i] if isinstance(self.images, Tensor) else torch.from_numpy(np.array(self.images[i]))

    def __getitems__(self, idx: list[int]) -> Tensor:
        """A whole batch in one indexing op (the DataLoader uses this when present)."""
        if isinstance(self.images, Tensor):
            return self.images[torch.as_tensor(idx if self.indices is None else self.indices[idx])]
        rows = np.asarray(idx, dtype=np.int64)
        if self.indices is not None:
            rows = self.indices[rows]
        order = np.argsort(rows, kind="stable")  # read the map in ascending order, then restore the batch order
        out = np.empty((len(rows), *self.images.shape[1:]), dtype=self.images.dtype)
        out[order] = self.images[rows[order]]
        return torch.from_numpy(out)

    def __getstate__(self):
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap) and self.images.filename:
            state["images"] = ("npy", self.images.filename)
        return state

    def __setstate__(self, state):
        if isinstance(state["images"], tuple) and state["images"][0] == "npy":
            state["images"] = np.load(state["images"][1], mmap_mode="r")
        self.__dict__.update(state)

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


def _image_files(root: Path) -> list[str]:
    """Relative paths (strings: ~60 bytes each, not Path objects) of every image under ``root``, sorted."""
    from PIL import Image

    exts = {e.lower() for e in Image.registered_extensions()}
    files = []
    for dirpath, _, names in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        files.extend(n if rel == "." else os.path.join(rel, n) for n in names if os.path.splitext(n)[1].lower() in exts)
    return sorted(files)


def _decode(path: Path, size: int, mode: str) -> np.ndarray:
    """One image as uint8 ``(C, size, size)``: short side resized (bicubic) to ``size``, then center-cropped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            w, h = im.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None if scale > 0.5 else 3.0)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:  # what PIL raises
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e} (remove or replace the file)") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _decode_chunk(npy: str, offset: int, root: str, files: list[str], first: int, size: int, mode: str) -> int:
    """Worker: decode ``files`` and write them as images ``first, first + 1, ...`` of the ``.npy`` at ``npy``
    (pixel data starting at byte ``offset``) with ``os.pwrite``: the pixels go to the page cache, never into
    this process's resident memory beyond one image."""
    fd = os.open(npy, os.O_WRONLY)
    try:
        for j, rel in enumerate(files):
            arr = np.ascontiguousarray(_decode(Path(root) / rel, size, mode))
            os.pwrite(fd, arr.data, offset + (first + j) * arr.nbytes)
    finally:
        os.close(fd)
    return len(files)


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "maskdm"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _decode_folder(npy: Path, root: Path, files: list[str], size: int, channels: int, mode: str,
                   workers: int) -> None:
    """Decode every file into a new ``.npy`` at ``npy`` (created with ``open_memmap``: the header, then the
    pixels written in place by ``workers`` processes in chunks). Resident memory stays at a few images per
    process whatever the dataset size; a failure removes the file and names the image."""
    np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(files), channels, size, size)).flush()
    offset = np.load(npy, mmap_mode="r").offset  # where the pixel data starts, after the header
    chunk = 64
    jobs = [(str(npy), offset, str(root), files[i:i + chunk], i, size, mode) for i in range(0, len(files), chunk)]
    from tqdm import tqdm

    # a bar on a terminal only (disable=None): a large folder takes a while once
    with tqdm(total=len(files), desc=f"decoding {root}", unit="img", disable=None, mininterval=2.0,
              leave=False) as bar:
        _run_chunks(jobs, workers, bar)


def _run_chunks(jobs: list, workers: int, bar) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            bar.update(_decode_chunk(*job))
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    # fork, as DataLoader workers: the workers touch only PIL, numpy and the file (never CUDA), and start without
    # re-importing torch (a spawned worker would cost ~300 MB each). A window of 2 chunks per worker in flight
    # keeps the queued file lists bounded too.
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        pending: set = set()
        it = iter(jobs)
        try:
            while True:
                for job in it:
                    pending.add(pool.submit(_decode_chunk, *job))
                    if len(pending) >= 2 * workers:
                        break
                if not pending:
                    break
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    bar.update(f.result())  # re-raises a worker's "cannot decode image <path>"
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _wait_for(cache: Path, err: Path, what: str) -> None:
    """Non-decoding DDP ranks: wait (polling, no collective with a timeout) for the decoding rank's cache file
    or its error marker."""
    while not cache.is_file():
        if err.is_file():
            raise ValueError(f"{what}: the decoding rank failed: {err.read_text().strip()}")
        time.sleep(0.5)


def load_image_folder(root: str, image_size: int, channels: int = 3, cache_dir: str | None = None,
                      use_cache: bool = True, workers: int | None = None):
    """Every image under ``root`` (recursive, any format PIL reads), resized (short side) and center-cropped
    to ``image_size``, as a read-only uint8 memory map ``(N, C, S, S)``.

    Decoded once, by ``workers`` processes (default ``min(16, CPUs)``) straight into a ``.npy`` in
    ``cache_dir`` keyed by (file list, sizes, mtimes, size, mode): the decode's memory does not grow with the
    dataset. The file is written under a temporary name and renamed into place when complete, so a crash
    never leaves a cache that reads as valid. Under torchrun, local rank 0 decodes and the other ranks of the
    node wait for the file (one decode per node). ``use_cache=False`` decodes into an unlinked temporary file.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder not found: {root_path.resolve()} (set data.root to a folder of images)")
    files = _image_files(root_path)
    if not files:
        raise FileNotFoundError(f"no images found under {root_path.resolve()} (searched recursively for the "
                                f"extensions PIL reads: .png, .jpg, .jpeg, .webp, ...)")
    mode = "L" if channels == 1 else "RGB"
    workers = workers or min(16, os.cpu_count() or 1)
    shape = (len(files), channels, image_size, image_size)
    if not use_cache:
        return _decode_to_temp(root_path, files, image_size, channels, mode, workers)
    h = hashlib.sha256(f"{root_path.resolve()}|{image_size}|{mode}".encode())
    for rel in files:
        st = os.stat(root_path / rel)
        h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = _cache_root(cache_dir) / f"folder-{h.hexdigest()[:20]}-{image_size}-{mode}.npy"
    err = cache.with_name(f".{cache.name}.error")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    writable = _writable(cache.parent)
    if not cache.is_file() and not writable:  # every rank decodes for itself (local rank 0 cannot publish)
        warnings.warn(f"folder cache {cache.parent} is not writable; decoding into a temporary file (decoded again "
                      f"next run; set data.cache_dir to a writable folder)", stacklevel=2)
        return _decode_to_temp(root_path, files, image_size, channels, mode, workers)
    if not cache.is_file() and local_rank != 0:
        _wait_for(cache, err, f"decoding {root_path}")
    if not cache.is_file():
        for stale in cache.parent.glob(f".{cache.name}.*.tmp"):  # left by a killed decode
            pid = stale.name.rsplit(".", 2)[-2]
            if not (pid.isdigit() and _pid_alive(int(pid))):
                stale.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        try:
            _decode_folder(tmp, root_path, files, image_size, channels, mode, workers)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, cache)  # the commit point: readers see a complete cache or none
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):  # decode faults are ValueErrors naming the image: this is the cache write
                e = OSError(e.errno, f"writing the folder cache {tmp} failed: {e.strerror or e} (free space there "
                                     f"or set data.cache_dir)")
            if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
                with contextlib.suppress(OSError):
                    err.write_text(str(e) or type(e).__name__)
            if isinstance(e, OSError):
                raise e from None
            raise
    arr = np.load(cache, mmap_mode="r")
    if arr.shape != shape or arr.dtype != np.uint8:
        raise ValueError(f"folder cache {cache} holds {arr.dtype} {arr.shape}, expected uint8 {shape}; delete it")
    return arr


def _decode_to_temp(root: Path, files: list[str], size: int, channels: int, mode: str, workers: int) -> np.ndarray:
    fd, name = tempfile.mkstemp(suffix=".npy", prefix="maskdm-folder-")
    os.close(fd)
    try:
        _decode_folder(Path(name), root, files, size, channels, mode, workers)
        return np.load(name, mmap_mode="r")  # the map keeps the unlinked file alive
    finally:
        os.unlink(name)


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
        images = load_image_folder(cfg.root, cfg.image_size, cfg.channels or 3, cfg.cache_dir,
                                   workers=cfg.decode_workers)
        name = f"folder:{cfg.root}"
    keep = _subset(images.shape[0], cfg.subset, cfg.subset_seed)
    if keep is None:
        return ImageTensorDataset(images, name)
    name += f" (subset {cfg.subset:g}: {len(keep)} images)"
    if isinstance(images, Tensor):
        return ImageTensorDataset(images[torch.from_numpy(keep)], name)
    return ImageTensorDataset(images, name, indices=keep)  # the memory map stays on disk


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
