"""`python -m distributed_step bench --input`: the input path alone, no model, no process group.

    python -m distributed_step bench --input --data synthetic --image-size 224 --worker-counts 0,1
    python -m distributed_step bench --input --make-jpegs /tmp/jpegs --data imagefolder:/tmp/jpegs --baseline

It iterates the package's own train_loader (sampler, dataset, workers, collate: what `train`
iterates) at one rank and reports images/s, images/s per worker and MB/s of the batches it
yields, then times device_input.DeviceTransform on that batch on the device. `--baseline` adds
what the input path was before uint8 (float32 samples; ImageFolder decoded at full size,
cropped and normalised in float on the CPU), measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distributed_step.config import ConfigError, OneLineErrorParser, TrainConfig, add_config_flags
from distributed_step.data.datasets import IMAGENET_MEAN, IMAGENET_STD, SyntheticImages, build_datasets
from distributed_step.data.device_input import DeviceFeed
from distributed_step.data.keys import sample_seed, split_key
from distributed_step.data.loaders import train_loader


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="distributed-step bench --input", argument_default=argparse.SUPPRESS,
                           description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="store_true", help="measure the input path (this tool)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per variant (default: 30)")
    p.add_argument("--worker-counts", default="1", help="loader workers to try, e.g. 0,1,2 (default: 1)")
    p.add_argument("--baseline", action="store_true", default=False, help="also the float32 / full-decode path")
    p.add_argument("--make-jpegs", default="", metavar="DIR",
                   help="first write an ImageFolder of 500x375 JPEGs there (train/ and val/, 10 classes)")
    p.add_argument("--jpegs", type=int, default=400, help="how many for --make-jpegs (default: 400)")
    add_config_flags(p, ("data", "image_size", "global_batch_size", "seed", "decode"))
    p.set_defaults(data="synthetic", image_size=224, global_batch_size=64)
    return p


def make_jpegs(root: str, count: int, width: int = 500, height: int = 375) -> None:
    """Photo-sized JPEGs with detail at every scale (gradients plus noise), 10 classes."""
    from PIL import Image

    g = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    for split, n in (("train", count), ("val", max(10, count // 10))):
        for i in range(n):
            folder = os.path.join(root, split, f"class_{i % 10}")
            os.makedirs(folder, exist_ok=True)
            pixels = np.clip(base * g.uniform(0.5, 1.0) + g.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)


class _FloatSynthetic(SyntheticImages):
    """The synthetic data before uint8: float32 Gaussian noise drawn per sample."""

    def __getitem__(self, key):
        _, i = split_key(key)
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.first + i))
        return torch.randn(3, self.image_size, self.image_size, generator=g), int(torch.randint(10, (), generator=g))


class _FullDecodeFolder(Dataset):
    """ImageFolder before uint8: full-size PIL decode, RandomResizedCrop, flip, ToTensor, Normalize."""

    def __init__(self, samples, size: int, seed: int):
        from torchvision import transforms as T

        self.samples, self.seed = samples, seed
        self.transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from distributed_step.data.images import read_image

        epoch, i = split_key(key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, i))
            return self.transform(read_image(self.samples[i][0])), self.samples[i][1]


def _time_loader(loader, batches: int) -> tuple[float, int, int]:
    """(seconds, images, bytes) over `batches` batches after the first (worker start-up)."""
    iterator = iter(loader)
    next(iterator)
    began, images, size = time.perf_counter(), 0, 0
    for _ in range(batches):
        batch = next(iterator)
        parts = batch[0] if isinstance(batch[0], list) else [batch[0]]  # --decode device: files' bytes
        images += len(batch[1])
        size += sum(part.numel() * part.element_size() for part in parts)
    return time.perf_counter() - began, images, size


def main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        counts = [int(w) for w in args["worker_counts"].split(",")]
    except ValueError:
        counts = [-1]
    if min(counts) < 0 or args["batches"] < 1:
        raise ConfigError(f"--worker-counts {args['worker_counts']!r} / --batches {args['batches']}: expected "
                          "worker counts >= 0 like 0,1,2 and at least 1 batch")
    if args["make_jpegs"]:
        make_jpegs(args["make_jpegs"], args["jpegs"])
    cfg = TrainConfig(**{k: args[k] for k in ("data", "image_size", "global_batch_size", "seed", "decode")
                         if k in args})
    cfg = cfg.validate(1)
    sets = build_datasets(cfg)
    variants = [("uint8", sets.train)]
    if args["baseline"]:
        kind = cfg.data.partition(":")[0]
        if kind == "synthetic":
            variants.append(("float32 (before)", _FloatSynthetic(cfg.synthetic_samples, cfg.image_size, cfg.seed)))
        elif kind == "imagefolder":
            variants.append(("full decode, float (before)", _FullDecodeFolder(sets.train.samples, cfg.image_size,
                                                                               cfg.seed)))
    needed = (args["batches"] + 1) * cfg.global_batch_size
    print(f"input path: --data {cfg.data} --image-size {cfg.image_size}, batches of {cfg.global_batch_size}, "
          f"{args['batches']} timed batches", flush=True)
    print(f"{'variant':<28} {'workers':>7} {'img/s':>9} {'per worker':>10} {'MB/s':>8}")
    for name, dataset in variants:
        if len(dataset) < needed:
            dataset = _Repeated(dataset, needed)
        for workers in counts:
            loader = _loader(dataset, cfg, workers)
            seconds, images, size = _time_loader(loader, args["batches"])
            rate = images / seconds
            print(f"{name:<28} {workers:>7} {rate:>9.0f} {rate / max(workers, 1):>10.0f} {size / seconds / 1e6:>8.1f}",
                  flush=True)
            del loader
    batch = next(iter(_loader(sets.train, cfg, 0)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    feed = DeviceFeed(sets.train_transform, device, channels_last=True, samples=getattr(sets.train, "samples", None))
    what = "decode, crop and transform" if cfg.decode == "device" else "device transform"
    print(f"{what} on {device}: {_time_feed(feed, batch, device):.2f} ms per batch of {len(batch[1])}")
    return 0


def _loader(dataset, cfg: TrainConfig, workers: int) -> DataLoader:
    """The trainer's own loader (ResumableSampler, batch size, worker settings) over `dataset`."""
    return train_loader(_Only(dataset), cfg, 0, 1, workers, pin=False)


class _Only:
    """What train_loader reads of a Datasets: its training set."""

    def __init__(self, train):
        self.train = train


class _Repeated(Dataset):
    """A small data set read round and round, so a benchmark can time many batches of it."""

    def __init__(self, base, length: int):
        self.base, self.length = base, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        epoch, i = split_key(key)
        return self.base[(epoch, i % len(self.base))]


def _time_feed(feed: DeviceFeed, batch, device: torch.device) -> float:
    """ms per batch of the device side alone: the copy, (decode,) crop, flip, normalise."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        feed.to_device(*batch)
    sync()
    began, rounds = time.perf_counter(), 10
    for _ in range(rounds):
        feed.to_device(*batch)
    sync()
    return 1e3 * (time.perf_counter() - began) / rounds
