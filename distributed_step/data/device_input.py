"""From the loader's uint8 batch to the model's input, on the device, once per batch.

Datasets yield uint8 CHW images (a quarter of float32's bytes through worker shared memory,
collate, pinning and the host-to-device copy) and, per sample, the parameters of its random
augmentation, drawn on the CPU from (seed, epoch, index):

    params[i] = (top, left, flip)   # a crop of the zero-padded image, and a horizontal flip

Everything per pixel happens here, on whole batches: resize, the padded random crop, the flip,
the cast, the normalisation and the channels_last layout (and with --decode device, the JPEG
decode and each sample's crop: images.decode_crops). The same code runs on CPU tensors,
so the CPU tests cover what a GPU runs.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NO_AUGMENT = (0, 0, 0)  # params of a sample taken as it is
CPU_FALLBACKS_NAMED = 10  # files the device decoder refused, named in a warning each; then only counted

log = logging.getLogger("distributed_step")


@dataclass(frozen=True)
class DeviceTransform:
    mean: tuple[float, ...]  # per channel, of the image scaled to [0, 1] (torchvision's convention)
    std: tuple[float, ...]
    size: int  # the side of the model's input
    pad: int = 0  # > 0: a random size x size crop of the image padded with this many zeros
    flip: bool = False  # honour params' flip column

    def __call__(self, images: torch.Tensor, params: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        x = images
        if x.shape[-2:] != (self.size, self.size):
            # Before the crop, as torchvision's Resize comes before RandomCrop.
            x = F.interpolate(x.float(), size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.pad:
            x = random_crops(x, params[:, 0], params[:, 1], self.pad)
        if self.flip:
            x = torch.where(params[:, 2].bool().view(-1, 1, 1, 1), x.flip(-1), x)
        if channels_last:  # on the 1-byte image: the float math below keeps the layout
            x = x.contiguous(memory_format=torch.channels_last)
        mean, scale = _constants(self.mean, self.std, x.device)
        return (x.float() - mean) * scale


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a tensor built from a list is a blocking host-to-device copy."""
    mean_t = torch.tensor(mean, device=device).mul_(255).view(1, -1, 1, 1)
    return mean_t, torch.tensor(std, device=device).mul_(255).reciprocal_().view(1, -1, 1, 1)


def random_crops(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, pad: int) -> torch.Tensor:
    """Per sample: the H x W window at (top, left) of the image zero-padded by `pad` on every
    side (torchvision's RandomCrop(size, padding=pad)), as one gather for the whole batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (top.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (left.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]


class DeviceFeed:
    """Iterates a loader's (uint8 images, labels, params) as (model input, labels) on the device.

    On CUDA the copy (from pinned memory, non_blocking) and the transform run on a side stream:
    while the GPU still runs step n, the host has already queued batch n+1's copy, which overlaps
    the step instead of preceding the next one. `wait_s` adds up the host's time waiting for the
    loader: the input's share of the step (logged as data_ms)."""

    def __init__(self, transform: DeviceTransform, device: torch.device, channels_last: bool, samples=None):
        self.transform, self.device, self.channels_last = transform, device, channels_last
        self.samples = samples  # (path, label) per index: names a file that fails to decode (--decode device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.wait_s = 0.0
        # --decode device: samples decoded on the device, by the loader workers (files the device
        # decoder does not take), on the host (files it refused); since the start, on this rank.
        self.decoded = {"device": 0, "workers": 0, "cpu": 0}
        self._reported = False

    def __call__(self, batches):
        iterator = iter(batches)
        try:
            while True:
                began = time.perf_counter()
                batch = next(iterator, None)
                self.wait_s += time.perf_counter() - began
                if batch is None:
                    break
                yield self.to_device(*batch)
        except GeneratorExit:  # the consumer stopped early (a stop request): the pass still counts
            self._report()
            raise
        self._report()

    def _report(self) -> None:
        """Once, at the end of the first pass (an epoch, or fewer steps), how many files did not
        take the device decoder. INFO shows on rank 0 only (metrics.setup_logging), so the count
        is rank 0's share of the data; the refusals are warnings, on every rank, as they happen."""
        seen = sum(self.decoded.values())
        if self._reported or not seen:
            return
        self._reported = True
        # ImageFolder's paths are split/class/file: the split names which feed this is (train, val).
        folder = os.path.dirname(os.path.dirname(self.samples[0][0])) if self.samples else "the data"
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        log.info("--decode device: %d of the %d files rank %d read from %s in its first pass were decoded in "
                 "the loader workers (not JPEGs the device decoder takes: PNG, CMYK, ...), %d on the CPU "
                 "after the device decoder refused them", self.decoded["workers"], seen, rank, folder,
                 self.decoded["cpu"])

    def to_device(self, images, labels: torch.Tensor, params: torch.Tensor):
        if self.stream is None:
            return self._prepare(images, labels, params)
        with torch.cuda.stream(self.stream):
            prepared = self._prepare(images, labels, params)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for tensor in prepared:
            tensor.record_stream(current)  # made on the side stream, used and freed on this one
        return prepared

    def _prepare(self, images, labels, params):
        if isinstance(images, list):  # --decode device: JPEG bytes (decoded as one batch here) and worker crops
            from distributed_step.data.images import decode_crops

            images, counts = decode_crops(images, params, self.transform.size, self.device, self.samples)
            self._count(counts)
            params = params[:, :3]
        else:
            images = images.to(self.device, non_blocking=True)
        params = params.to(self.device, non_blocking=True)
        return self.transform(images, params, self.channels_last), labels.to(self.device, non_blocking=True)

    def _count(self, counts) -> None:
        self.decoded["device"] += counts.device
        self.decoded["workers"] += counts.workers
        for path, reason in counts.cpu:
            self.decoded["cpu"] += 1
            if self.decoded["cpu"] <= CPU_FALLBACKS_NAMED:
                log.warning("--decode device: the device decoder refused %s (%s); decoded on the CPU instead%s",
                            path, reason,
                            " (further refusals are only counted)" if self.decoded["cpu"] == CPU_FALLBACKS_NAMED
                            else "")

    def take_wait_s(self) -> float:
        seconds, self.wait_s = self.wait_s, 0.0
        return seconds
