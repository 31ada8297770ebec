"""Image files (an ImageFolder's train/ and val/), decoded into uint8 crops of size x size.

RandomResizedCrop needs the file's own size, so it cannot wait for a batch on the device: its
box is drawn here from (seed, epoch, index), from the header alone. The file is decoded by
libjpeg-turbo through torchvision.io and the crop resized by torch's uint8 antialiased resize,
both faster than PIL's (docs/benchmarks.md, "How fast is the input"). A box at least 4x the
output on both sides is decoded by PIL at a reduced DCT scale instead (draft(): most of a large
photo's pixels are never decoded), the one case where that beats the full decode. The flip and the
normalisation run on the device
(device_input.DeviceTransform).
"""
from __future__ import annotations

import functools
import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distributed_step.config import ConfigError
from distributed_step.data.keys import sample_seed, split_key

TORCHVISION_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")  # PIL's names of what torchvision.io decodes
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


class ImageFiles(Dataset):
    """(uint8 size x size crop, label, params) of image files. Training: RandomResizedCrop's box
    (scale 0.08-1, ratio 3/4-4/3) and a flip per sample; held out: the short side resized to
    size * 256/224 and the centre size x size. `reduced_decode=False` decodes every pixel (the
    baseline that benchmarks measure against)."""

    def __init__(self, samples: list[tuple[str, int]], size: int, seed: int, train: bool,
                 reduced_decode: bool = True, on_device: bool = False):
        self.samples, self.size, self.seed, self.train = samples, size, seed, train
        self.reduced_decode, self.on_device = reduced_decode, on_device

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = split_key(key)
        path, label = self.samples[i]
        flip = 0
        if self.train:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
            chooser = functools.partial(_random_resized_box, g=g)
            flip = int(torch.randint(2, (), generator=g))
        else:
            chooser = self._centre_box
        if self.on_device:  # the file's bytes and the box; decode_crops() does the rest on the device
            encoded, (width, height) = _jpeg_bytes(path)
            left, top, w, h = (round(v) for v in chooser(width, height))
            return encoded, label, torch.tensor((0, 0, flip, left, top, w, h, i), dtype=torch.int32)
        pixels = decode_crop(path, chooser, self.size, reduce=self.reduced_decode)
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


def read_image(path: str):
    """PIL RGB image of `path` at full size (the baseline's decoder), or UnreadableImage."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")  # decodes now, while the file is open
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


def decode_crop(path: str, chooser, size: int, reduce: bool = True) -> torch.Tensor:
    """uint8 (3, size, size): the box chooser(width, height) -> (left, top, w, h) of `path`,
    resized with antialiasing. `reduce` lets a JPEG decode at a reduced scale where that pays."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            data = bytearray(fh.read())  # writable: torch.frombuffer shares it
        header = Image.open(io.BytesIO(data))  # parses the header only
        width, height = header.size
        left, top, w, h = chooser(width, height)
        scale = max((s for s in (8, 4) if s * size <= min(w, h)), default=1) if reduce else 1
        if scale > 1 and header.format == "JPEG":
            header.draft("RGB", (width // scale, height // scale))
            sx, sy = header.size[0] / width, header.size[1] / height
            box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
            crop = header.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
            return torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous()
        image = _decode_rgb(data, header)
    except (OSError, ValueError, SyntaxError, RuntimeError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None
    left, top = round(left), round(top)
    box = image[:, top:top + round(h), left:left + round(w)].unsqueeze(0)
    # channels_last: torch's fast uint8 path for antialiased bilinear resizing.
    box = box.contiguous(memory_format=torch.channels_last)
    return F.interpolate(box, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].contiguous()


def _decode_rgb(data: bytearray, header) -> torch.Tensor:
    """uint8 (3, H, W). torchvision.io's libjpeg-turbo / libpng decoders for the formats they
    read as 8-bit RGB (deprecated since torchvision 0.29 in favour of TorchCodec, still shipped);
    PIL for the rest of what ImageFolder lists (BMP, TIFF, PPM, ...) and where they are gone."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        decode_image = None
    if decode_image is not None and header.format in TORCHVISION_FORMATS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        if image.dtype == torch.uint8:  # a 16-bit PNG comes back as uint16: PIL scales it below
            return image
    return torch.from_numpy(np.array(header.convert("RGB"))).permute(2, 0, 1)


def _unreadable(path: str, exc: BaseException) -> UnreadableImage:
    return UnreadableImage(f"unreadable image {path} ({type(exc).__name__}: {exc}); fix or remove the file")


def _jpeg_bytes(path: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """(the file as a uint8 tensor, (width, height) from its header); JPEG only."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            data = bytearray(fh.read())
        header = Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None
    if header.format != "JPEG":
        raise UnreadableImage(f"--decode device decodes JPEG files only: {path} is {header.format}; "
                              "convert it, or use --decode workers")
    return torch.frombuffer(data, dtype=torch.uint8), header.size


def collate_encoded(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch of --decode device samples: the files' bytes stay a list (their lengths differ)."""
    encoded, labels, params = zip(*batch)
    return list(encoded), torch.tensor(labels), torch.stack(params)


def decode_crops(encoded: list[torch.Tensor], params: torch.Tensor, size: int, device: torch.device,
                 samples: list[tuple[str, int]]) -> torch.Tensor:
    """float (N, 3, size, size) in 0-255 on `device`: the JPEGs decoded as one batch there
    (nvjpeg on CUDA, libjpeg-turbo on CPU) and each sample's box resized with antialiasing.
    params rows: (0, 0, flip, left, top, w, h, index into samples), on the host."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    try:
        images = decode(encoded)
    except RuntimeError:
        for data, row in zip(encoded, params.tolist()):  # find the file to name
            try:
                decode(data)
            except RuntimeError as exc:
                raise _unreadable(samples[row[7]][0], exc) from None
        raise
    crops = [F.interpolate(image[:, top:top + h, left:left + w].unsqueeze(0).float(), size=(size, size),
                           mode="bilinear", antialias=True, align_corners=False)
             for image, (_, _, _, left, top, w, h, _) in zip(images, params.tolist())]
    return torch.cat(crops)
