"""Image files (an ImageFolder's train/ and val/), decoded into uint8 crops of size x size.

RandomResizedCrop needs the file's own size, so it cannot wait for a batch on the device: its
box is drawn here from (seed, epoch, index), from the header alone. The file is decoded by
libjpeg-turbo through torchvision.io and the crop resized by torch's uint8 antialiased resize,
both faster than PIL's (docs/benchmarks.md, "How fast is the input"). A box at least 4x the
output on both sides is decoded by PIL at a reduced DCT scale instead (draft(): most of a large
photo's pixels are never decoded), the one case where that beats the full decode. The flip and the
normalisation run on the device (device_input.DeviceTransform).

With --decode device a JPEG that the device's decoder takes (jpeg_header.read_frame) travels as
its bytes and box and is decoded there (decode_crops); every other file (a PNG named .JPEG, a
CMYK JPEG, ...) is decoded here as above, so one odd file in a million costs one worker decode
instead of the run.
"""
from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distributed_step.config import ConfigError
from distributed_step.data.jpeg_header import read_frame
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
        if self.on_device:
            return self._for_device(path, label, chooser, flip, i)
        pixels = decode_crop(path, chooser, self.size, reduce=self.reduced_decode)
        return pixels, label, torch.tensor((0, 0, flip), dtype=torch.int16)

    def _for_device(self, path: str, label: int, chooser, flip: int, i: int):
        """--decode device: a JPEG the device decoder takes travels as the file's bytes and its box
        (decode_crops() does the rest there); any other file is decoded here, into the same crop
        as --decode workers gives, and travels as that. params' box columns are 0 for the latter."""
        data = _read(path)
        frame = read_frame(data)
        if frame is not None and frame.device_decodable:
            left, top, w, h = (round(v) for v in chooser(frame.width, frame.height))
            return torch.frombuffer(data, dtype=torch.uint8), label, _device_params(flip, left, top, w, h, i)
        pixels = decode_crop(path, chooser, self.size, reduce=self.reduced_decode, data=data)
        return pixels, label, _device_params(flip, 0, 0, 0, 0, i)

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


def decode_crop(path: str, chooser, size: int, reduce: bool = True, data: bytearray | None = None) -> torch.Tensor:
    """uint8 (3, size, size): the box chooser(width, height) -> (left, top, w, h) of `path`,
    resized with antialiasing. `reduce` lets a JPEG decode at a reduced scale where that pays.
    `data`: the file's bytes when the caller has already read them."""
    from PIL import Image

    data = _read(path) if data is None else data
    try:
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


def _read(path: str) -> bytearray:
    """The file's bytes, writable (torch.frombuffer shares them), or UnreadableImage."""
    try:
        with open(path, "rb") as fh:
            return bytearray(fh.read())
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _device_params(flip: int, left: int, top: int, w: int, h: int, index: int) -> torch.Tensor:
    return torch.tensor((0, 0, flip, left, top, w, h, index), dtype=torch.int32)


def collate_encoded(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A batch of --decode device samples: a list (the files' lengths differ) of JPEG bytes
    (1-D) and crops the worker decoded (3-D), in the batch's order."""
    items, labels, params = zip(*batch)
    return list(items), torch.tensor(labels), torch.stack(params)


@dataclass
class DecodeCounts:
    """Where a batch's samples were decoded. `cpu`: (path, the decoder's error) of each file the
    device decoder refused although its header passed read_frame(), decoded on the host instead."""
    device: int = 0
    workers: int = 0
    cpu: list[tuple[str, str]] = field(default_factory=list)


def decode_crops(items: list[torch.Tensor], params: torch.Tensor, size: int, device: torch.device,
                 samples: list[tuple[str, int]]) -> tuple[torch.Tensor, DecodeCounts]:
    """(float (N, 3, size, size) in 0-255 on `device`, where each was decoded). The JPEGs' bytes
    are decoded as one batch there (nvjpeg on CUDA, libjpeg-turbo on CPU) and each sample's box
    resized with antialiasing; crops the workers decoded are copied as they are. A JPEG the device
    decoder refuses is decoded on the host from its file, with the same box, rather than ending
    the run; only a file no decoder reads raises UnreadableImage. params rows: (0, 0, flip, left,
    top, w, h, index into samples), on the host."""
    rows = params.tolist()
    jpegs = [k for k, item in enumerate(items) if item.dim() == 1]
    decoded = _decode_jpegs([items[k] for k in jpegs], device)
    crops: list[torch.Tensor | None] = [None] * len(items)
    counts = DecodeCounts(workers=len(items) - len(jpegs))
    for k, image in zip(jpegs, decoded):
        _, _, _, left, top, w, h, index = rows[k]
        if isinstance(image, Exception):  # refused: the host's decoders, as --decode workers uses them
            path = samples[index][0]
            box = decode_crop(path, lambda *_, b=(left, top, w, h): b, size)
            crops[k] = box.to(device).unsqueeze(0).float()
            counts.cpu.append((path, f"{type(image).__name__}: {image}"))
            continue
        crops[k] = F.interpolate(image[:, top:top + h, left:left + w].unsqueeze(0).float(), size=(size, size),
                                 mode="bilinear", antialias=True, align_corners=False)
        counts.device += 1
    for k, item in enumerate(items):
        if crops[k] is None:  # the worker's crop
            crops[k] = item.to(device, non_blocking=True).unsqueeze(0).float()
    return torch.cat(crops), counts


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """The images decoded on `device`, as one batch; if the batch call raises, one by one, with
    the error in place of each file the decoder refuses (the batch call does not say which)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    if not encoded:
        return []
    try:
        return list(decode(encoded))
    except (RuntimeError, ValueError):
        pass
    images = []
    for data in encoded:
        try:
            images.append(decode(data))
        except (RuntimeError, ValueError) as exc:
            images.append(exc)
    return images
