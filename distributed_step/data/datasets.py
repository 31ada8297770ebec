"""Datasets: each sample is (uint8 CHW image, label, augmentation params).

Every random choice about a sample (synthetic pixels, augmentation) is a function of
(seed, epoch, index) only. So a global batch holds the same images whatever the world size,
and a run resumed mid-epoch sees exactly the images the uninterrupted run would have seen.
The training sampler hands each dataset keys (epoch, index); the held-out loader plain indices.

Per-pixel work that can run on whole batches (the padded random crop, flips, normalisation)
is left to device_input.DeviceTransform; what needs the file (decoding, ImageFolder's
RandomResizedCrop of images of any size) happens here, in uint8, at reduced size.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distributed_step.config import ConfigError, TrainConfig
from distributed_step.data.device_input import NO_AUGMENT, DeviceTransform
from distributed_step.data.images import ImageFiles, collate_encoded, list_image_folder
from distributed_step.data.keys import sample_seed, split_key

SYNTHETIC_CLASSES = 10
# Odd on purpose: a held-out set that does not split evenly over ranks keeps evaluation honest.
SYNTHETIC_HELD_OUT = 257
DIGITS_HELD_OUT = 360  # 20% of scikit-learn's 1,797 digits, fixed whatever --seed says
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
UNIFORM_MEAN, UNIFORM_STD = (0.5,) * 3, (1 / math.sqrt(12),) * 3  # of uniform bytes


def _params(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int16)


def synthetic_batch(n: int, image_size: int, classes: int, device: torch.device, seed: int,
                    channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float images, labels) on `device`, the same for the same seed: the batch that bench,
    doctor and --comm-hook auto time the step with, so that they all time the same thing."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=gen).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(classes, (n,), generator=gen).to(device)


class SyntheticImages(Dataset):
    """Uniform random bytes with uniform labels; sample i depends on (seed, i) alone. Each image
    is a window of one shared block of random bytes at an offset drawn from (seed, i): no random
    number per pixel, so the loader runs at memory speed and `--data synthetic` measures the
    training system, not a random number generator."""

    SPREAD = 1 << 20  # distinct offsets (1 MB of extra bytes in the block)

    def __init__(self, length: int, image_size: int, seed: int, first_index: int = 0):
        self.length, self.image_size, self.seed, self.first = length, image_size, seed, first_index
        self._block = None  # made on first use, in the process that reads it (not pickled to workers)

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):
        return {**self.__dict__, "_block": None}

    def __getitem__(self, key):
        _, i = split_key(key)
        pixels = 3 * self.image_size * self.image_size
        if self._block is None:
            g = torch.Generator().manual_seed(sample_seed(self.seed, -1))
            self._block = torch.randint(0, 256, (pixels + self.SPREAD,), dtype=torch.uint8, generator=g)
        mixed = sample_seed(self.seed, self.first + i)
        offset = mixed % self.SPREAD
        image = self._block[offset:offset + pixels].view(3, self.image_size, self.image_size)
        return image, sample_seed(mixed, 1) % SYNTHETIC_CLASSES, _params(*NO_AUGMENT)


class DigitsImages(Dataset):
    """scikit-learn's real 8x8 handwritten digits, upsampled to image_size, as 3-channel uint8."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, image_size: int):
        x = pixels.view(-1, 1, 8, 8) / 16.0
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = x.mul(255).round_().clamp_(0, 255).to(torch.uint8)  # one channel kept
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        _, i = split_key(key)
        return self.images[i].expand(3, -1, -1), int(self.labels[i]), _params(*NO_AUGMENT)


@dataclass
class Datasets:
    train: Dataset
    held_out: Dataset | None
    num_classes: int
    in_memory: bool  # no file I/O per sample: loader workers would only add overhead
    train_transform: DeviceTransform
    held_out_transform: DeviceTransform
    collate: Callable | None = None  # the loaders' collate_fn when samples are not tensors of one shape


def build_datasets(cfg: TrainConfig) -> Datasets:
    """Raises ConfigError naming --data when a path or file is missing (before any collective)."""
    kind, _, path = cfg.data.partition(":")
    size = cfg.image_size
    if kind == "synthetic":
        plain = DeviceTransform(UNIFORM_MEAN, UNIFORM_STD, size)
        return Datasets(SyntheticImages(cfg.synthetic_samples, size, cfg.seed),
                        SyntheticImages(SYNTHETIC_HELD_OUT, size, cfg.seed, first_index=1 << 31),
                        SYNTHETIC_CLASSES, True, plain, plain)
    if kind == "digits":
        return _digits(size)
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
    # Roughly zero mean and unit variance; the constants are the data set's own.
    plain = DeviceTransform((0.3,) * 3, (0.4,) * 3, image_size)
    return Datasets(DigitsImages(pixels[train], labels[train], image_size),
                    DigitsImages(pixels[held], labels[held], image_size), 10, True, plain, plain)


def _imagefolder(root: str, cfg: TrainConfig) -> Datasets:

    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(train_dir):
        raise ConfigError(f"--data {cfg.data}: expected a train/ folder in {root}")
    train_classes, train_samples = list_image_folder(train_dir, cfg.data)
    on_device = cfg.decode == "device"
    held = None
    if os.path.isdir(val_dir):
        val_classes, val_samples = list_image_folder(val_dir, cfg.data)
        if val_classes != train_classes:
            # Each folder is numbered on its own: different class lists would shift labels.
            raise ConfigError(f"--data {cfg.data}: val/ classes {val_classes} differ from train/ classes "
                              f"{train_classes}")
        held = ImageFiles(val_samples, cfg.image_size, cfg.seed, train=False, on_device=on_device)
    size = cfg.image_size
    return Datasets(ImageFiles(train_samples, size, cfg.seed, train=True, on_device=on_device), held,
                    len(train_classes), False, DeviceTransform(IMAGENET_MEAN, IMAGENET_STD, size, flip=True),
                    DeviceTransform(IMAGENET_MEAN, IMAGENET_STD, size), collate_encoded if on_device else None)


class CifarImages(Dataset):
    """CIFAR-10's 32 x 32 uint8 arrays as they are; the crop (padding size // 8) and the flip
    are drawn here and applied on the device, after the resize to image_size."""

    def __init__(self, pixels: np.ndarray, labels: list[int], seed: int, pad: int):
        self.pixels, self.labels, self.seed, self.pad = pixels, labels, seed, pad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        epoch, i = split_key(key)
        image = torch.from_numpy(self.pixels[i]).permute(2, 0, 1).contiguous()
        if not self.pad:
            return image, self.labels[i], _params(*NO_AUGMENT)
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
        top, left = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,), generator=g))
        return image, self.labels[i], _params(top, left, int(torch.randint(2, (), generator=g)))


def _cifar10(root: str, cfg: TrainConfig) -> Datasets:
    from torchvision import datasets

    _check_cifar10_files(root, cfg)
    size, pad = cfg.image_size, cfg.image_size // 8
    train = datasets.CIFAR10(root, train=True, download=False)
    held = datasets.CIFAR10(root, train=False, download=False)
    return Datasets(CifarImages(train.data, train.targets, cfg.seed, pad),
                    CifarImages(held.data, held.targets, cfg.seed, 0), 10, True,  # arrays: workers only copy
                    DeviceTransform(CIFAR_MEAN, CIFAR_STD, size, pad=pad, flip=True),
                    DeviceTransform(CIFAR_MEAN, CIFAR_STD, size))


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


def check_batch_fits(sets: Datasets, cfg: TrainConfig) -> None:
    if len(sets.train) < cfg.global_batch_size:
        raise ConfigError(f"--global-batch-size {cfg.global_batch_size} is larger than the training set "
                          f"({len(sets.train)} samples)")
