"""Image files (an ImageFolder's train/ and val/), decoded at reduced size into uint8 crops.

RandomResizedCrop needs the file's own size, so it cannot wait for a batch on the device: its
box is drawn here from (seed, epoch, index), the JPEG is decoded at the smallest DCT scale
(1/2, 1/4, 1/8) at which the box still covers the output size (PIL's draft(): most of a large
photo's pixels are never decoded), and the box is resized to size x size in one uint8 step.
The flip and the normalisation run on the device (device_input.DeviceTransform).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import ConfigError

RESIZE_RATIO = 256 / 224  # held-out images: the short side to size * this, then the centre crop


class UnreadableImage(RuntimeError):
    """An image file that cannot be decoded. The run fails on it, naming the file: a data set
    that silently loses samples trains on something other than what the user pointed at."""


def list_image_folder(folder: str, data_flag: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) of a folder of class folders (torchvision's ImageFolder rules)."""
    import os

    from torchvision import datasets

    try:
        found = datasets.ImageFolder(folder, loader=read_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"--data {data_flag}: {os.path.basename(folder)}/: {exc}") from None
    return found.classes, found.samples


def read_image(path: str):
    """PIL RGB image of `path` decoded at full size, or UnreadableImage naming the file."""
    return decode(path)


class ImageFiles(Dataset):
    """(uint8 size x size crop, label, params) of image files. Training: RandomResizedCrop's box
    (scale 0.08-1, ratio 3/4-4/3) and a flip per sample; held out: the short side resized to
    size * 256/224 and the centre size x size. `reduced_decode=False` decodes every pixel (the
    baseline that benchmarks measure against)."""

    def __init__(self, samples: list[tuple[str, int]], size: int, seed: int, train: bool,
                 reduced_decode: bool = True):
        self.samples, self.size, self.seed, self.train = samples, size, seed, train
        self.reduced_decode = reduced_decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from .data import sample_seed, split_key

        epoch, i = split_key(key)
        path, label = self.samples[i]
        flip = 0
        if self.train:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
            chooser = functools.partial(_random_resized_box, g=g)
            flip = int(torch.randint(2, (), generator=g))
        else:
            chooser = self._centre_box
        crop = decode(path, chooser, self.size, reduce=self.reduced_decode)
        pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous()
        return pixels, label, torch.tensor((0, 0, flip), dtype=torch.int16)

    def _centre_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        side = self.size * min(width, height) / (self.size * RESIZE_RATIO)
        return (width - side) / 2, (height - side) / 2, side, side


def _random_resized_box(width: int, height: int, g: torch.Generator) -> tuple[float, float, float, float]:
    """(left, top, w, h) as torchvision's RandomResizedCrop.get_params draws it, from `g`."""
    area = width * height
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(0.08, 1.0, generator=g))
        log_ratio = float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
        w = round(math.sqrt(target * math.exp(log_ratio)))
        h = round(math.sqrt(target / math.exp(log_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return left, top, w, h
    w, h = min(width, height), min(width, height)  # the centre square, as torchvision falls back
    return (width - w) // 2, (height - h) // 2, w, h


def decode(path: str, chooser=None, size: int = 0, reduce: bool = True):
    """Decode `path`; with a chooser (width, height) -> (left, top, w, h), return that box resized
    to size x size. `reduce` lets a JPEG decode at a reduced scale that still covers the box."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            if chooser is None:
                return image.convert("RGB")  # decodes now, while the file is open
            width, height = image.size
            left, top, w, h = chooser(width, height)
            if reduce:
                least = max(size / w, size / h)  # the smallest scale at which the box keeps size pixels
                image.draft("RGB", (math.ceil(width * least), math.ceil(height * least)))
            sx, sy = image.size[0] / width, image.size[1] / height
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            return image.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"unreadable image {path} ({type(exc).__name__}: {exc}); "
                              "fix or remove the file") from None
