"""Datasets, the resumable distributed sampler, and the train / held-out loaders.

Every random choice about a sample (synthetic pixels, augmentation) is a function of
(seed, epoch, index) only. So a global batch holds the same images whatever the world size,
and a run resumed mid-epoch sees exactly the images the uninterrupted run would have seen.
"""
from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .config import ConfigError, TrainConfig

SYNTHETIC_CLASSES = 10
# Odd on purpose: a held-out set that does not split evenly over ranks keeps evaluation honest.
SYNTHETIC_HELD_OUT = 257
DIGITS_HELD_OUT = 360  # 20% of scikit-learn's 1,797 digits, fixed whatever --seed says
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample_seed(*keys: int) -> int:
    """A seed from several integers. torch's CPU generator (mt19937) keeps only 32 bits of a
    seed, so `seed << 32 | index` would ignore the seed: mix everything into 32 bits instead.
    (hash() of a tuple of ints is the same in every process; only str hashes are salted.)"""
    return hash(keys) & 0xFFFF_FFFF


class SyntheticImages(Dataset):
    """Gaussian images with uniform labels; sample i depends on (seed, i) alone."""

    def __init__(self, length: int, image_size: int, seed: int, first_index: int = 0):
        self.length, self.image_size, self.seed, self.first = length, image_size, seed, first_index

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.first + i))
        image = torch.randn(3, self.image_size, self.image_size, generator=g)
        label = int(torch.randint(SYNTHETIC_CLASSES, (), generator=g))
        return image, label


class DigitsImages(Dataset):
    """scikit-learn's real 8x8 handwritten digits, upsampled to image_size, as 3-channel tensors."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, image_size: int):
        x = pixels.view(-1, 1, 8, 8) / 16.0
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        # Scaled to roughly zero mean and unit variance; the constants are the data set's own.
        self.images = (x - 0.3) / 0.4  # one channel kept; expanded to three per sample (a view)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i].expand(3, -1, -1), int(self.labels[i])


class SeededAugment(Dataset):
    """Runs a dataset's random transforms under a seed made of (seed, epoch, index)."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            return self.base[i]


@dataclass
class Datasets:
    train: Dataset
    held_out: Dataset | None
    num_classes: int
    in_memory: bool  # no file I/O per sample: loader workers would only add overhead


def build_datasets(cfg: TrainConfig) -> Datasets:
    """Raises ConfigError naming --data when a path or file is missing (before any collective)."""
    kind, _, path = cfg.data.partition(":")
    if kind == "synthetic":
        return Datasets(SyntheticImages(cfg.synthetic_samples, cfg.image_size, cfg.seed),
                        SyntheticImages(SYNTHETIC_HELD_OUT, cfg.image_size, cfg.seed, first_index=1 << 31),
                        SYNTHETIC_CLASSES, True)
    if kind == "digits":
        return _digits(cfg.image_size)
    if not os.path.isdir(path):
        raise ConfigError(f"--data {cfg.data}: directory {path} does not exist")
    if kind == "imagefolder":
        return _imagefolder(path, cfg)
    return _cifar10(path, cfg)


def _digits(image_size: int) -> Datasets:
    from sklearn.datasets import load_digits  # ships the data: nothing is downloaded

    bunch = load_digits()
    pixels = torch.as_tensor(bunch.data, dtype=torch.float32)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1797))
    train, held = order[:-DIGITS_HELD_OUT], order[-DIGITS_HELD_OUT:]
    return Datasets(DigitsImages(pixels[train], labels[train], image_size),
                    DigitsImages(pixels[held], labels[held], image_size), 10, True)


def _imagefolder(root: str, cfg: TrainConfig) -> Datasets:
    from torchvision import transforms as T

    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(train_dir):
        raise ConfigError(f"--data {cfg.data}: expected a train/ folder in {root}")
    size = cfg.image_size
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    val_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), *norm])
    train = _image_folder(train_dir, train_tf, cfg)
    held = _image_folder(val_dir, val_tf, cfg) if os.path.isdir(val_dir) else None
    if held is not None and held.classes != train.classes:
        # Each ImageFolder numbers its own folders: different class lists would shift labels.
        raise ConfigError(f"--data {cfg.data}: val/ classes {held.classes} differ from train/ classes {train.classes}")
    return Datasets(SeededAugment(train, cfg.seed), held, len(train.classes), False)


class UnreadableImage(RuntimeError):
    """An image file that cannot be decoded. The run fails on it, naming the file: a data set
    that silently loses samples trains on something other than what the user pointed at."""


def read_image(path: str):
    """PIL RGB image of `path`, or UnreadableImage naming the file (a truncated or empty JPEG,
    a text file with an image's extension)."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert("RGB")  # decodes now, while the file is open
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"unreadable image {path} ({type(exc).__name__}: {exc}); "
                              "fix or remove the file") from None


def _image_folder(folder: str, transform, cfg: TrainConfig):
    from torchvision import datasets

    split = os.path.basename(folder)
    try:
        return datasets.ImageFolder(folder, transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"--data {cfg.data}: {split}/: {exc}") from None


def _cifar10(root: str, cfg: TrainConfig) -> Datasets:
    from torchvision import datasets
    from torchvision import transforms as T

    size = cfg.image_size
    resize = [] if size == 32 else [T.Resize(size)]
    norm = [T.ToTensor(), T.Normalize((0.491, 0.482, 0.447), (0.247, 0.243, 0.262))]
    train_tf = T.Compose([*resize, T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), *norm])
    _check_cifar10_files(root, cfg)
    train = datasets.CIFAR10(root, train=True, transform=train_tf, download=False)
    held = datasets.CIFAR10(root, train=False, transform=T.Compose([*resize, *norm]), download=False)
    return Datasets(SeededAugment(train, cfg.seed), held, 10, False)


def _check_cifar10_files(root: str, cfg: TrainConfig) -> None:
    """Name the missing or corrupt file (torchvision only says "not found or corrupted" and
    suggests download=True, which runs here never do)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = os.path.join(root, CIFAR10.base_folder)
    for name, md5 in CIFAR10.train_list + CIFAR10.test_list:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ConfigError(f"--data {cfg.data}: {path} is missing (expected torchvision's "
                              f"{CIFAR10.base_folder}/ in {root})")
        if not check_integrity(path, md5):
            raise ConfigError(f"--data {cfg.data}: {path} is corrupt (its md5 is not {md5}); copy it again")


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch, skipping the batches already trained on.

    drop_last=True gives every rank the same number of samples (uneven shards hang a
    collective), and rank r's k-th batch together with the other ranks' k-th batches is exactly
    the k-th global batch of the epoch's permutation: the same whatever the world size.
    """

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int, batch_per_rank: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_per_rank, self.skip = batch_per_rank, 0

    def set_position(self, epoch: int, batches_done: int) -> None:
        self.set_epoch(epoch)
        self.skip = batches_done * self.batch_per_rank
        if isinstance(self.dataset, SeededAugment):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return self.num_samples - self.skip


def loader_workers(cfg: TrainConfig, sets: Datasets, local_world_size: int) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    return 0 if sets.in_memory else max(1, min(4, (os.cpu_count() or 1) // local_world_size))


def train_loader(sets: Datasets, cfg: TrainConfig, rank: int, world_size: int, workers: int,
                 pin: bool) -> DataLoader:
    per_rank = cfg.global_batch_size // world_size
    sampler = ResumableSampler(sets.train, world_size, rank, cfg.seed, per_rank)
    return DataLoader(sets.train, batch_size=per_rank, sampler=sampler, drop_last=True, pin_memory=pin,
                      **_worker_options(workers))


def check_batch_fits(sets: Datasets, cfg: TrainConfig) -> None:
    if len(sets.train) < cfg.global_batch_size:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is larger than the training set "
                          f"({len(sets.train)} samples)")


def _worker_options(workers: int) -> dict:
    """Loader workers start from a forkserver, not by forking the trainer.

    Forking a process with threads (gloo's, the other loader's queue feeders) hung a new worker
    in about 1 run of 5 here: CPython 3.11's after-fork cleanup in the child waited for a lock
    that another thread of the parent held at the moment of the fork, and the rank then waited
    for that worker forever. The forkserver is a fresh single-threaded process that imports
    torch and this module once, so each worker is a cheap fork of a clean process.
    """
    if workers == 0:
        return {}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision", __name__])
    return {"num_workers": workers, "multiprocessing_context": context,
            "worker_init_fn": functools.partial(_start_worker, os.getpid())}


def _start_worker(trainer_pid: int, worker_id: int) -> None:
    """torchrun and Kubernetes signal the whole process group: loader workers must outlive the
    SIGTERM so that the trainer can finish its step and save. They exit with the trainer: torch's
    own check watches the worker's parent, which is the forkserver (it outlives the trainer,
    held open by the workers themselves), so each worker also watches the trainer."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(trainer_pid,), name="exit-with-trainer", daemon=True).start()


def _exit_with(pid: int) -> None:
    while _alive(pid):
        time.sleep(1.0)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:  # gone (or no /proc: fall back to a signal-0 probe)
        try:
            os.kill(pid, 0)
            return not os.path.isdir("/proc")
        except OSError:
            return False


def held_out_loader(sets: Datasets, batch_size: int, rank: int, world_size: int, workers: int,
                    pin: bool) -> DataLoader | None:
    """Rank r evaluates samples r, r+W, r+2W, ...: no padding, so no sample counts twice."""
    if sets.held_out is None:
        return None
    shard = Subset(sets.held_out, range(rank, len(sets.held_out), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, pin_memory=pin, **_worker_options(workers))
