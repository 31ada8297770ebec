"""--decode device on the files ImageNet really holds (a PNG named .JPEG, CMYK JPEGs) and a few
more (grayscale JPEG, RGBA PNG, upper-case .JPG, progressive JPEG): files the device decoder does
not take are decoded in the loader worker, the rest on the device, and every sample is the crop
--decode workers gives for the same (seed, epoch, index). On CPU tensors: the code a GPU runs."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from distributed_step.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from distributed_step.data.device_input import DeviceFeed, DeviceTransform
from distributed_step.data.images import ImageFiles, collate_encoded, decode_crops
from distributed_step.data.jpeg_header import read_frame
from tests.helpers import python_cmd, run_ok

SIZE = 32
# name -> taken by the device decoder (travels as bytes) or decoded in the worker (a uint8 crop)
KINDS = {"rgb.jpg": "device", "upper.JPG": "device", "gray.jpg": "device", "progressive.jpg": "device",
         "png_named.JPEG": "worker", "cmyk.jpg": "worker", "rgba.png": "worker"}
# Device-decoded samples: the same libjpeg-turbo decode of the same box, resized by the same
# antialiased bilinear kernel, in float on the device path and in uint8 on the workers'. torch's
# uint8 kernel is separable and rounds to uint8 after each pass (horizontal, then vertical): two
# roundings of at most 0.5 level each, and a pass's weights sum to 1, so the two differ by at most
# 1 level of 255 (measured: 0.5-1.0), plus 0.01 for the uint8 kernel's fixed-point weights. On
# CUDA, nvjpeg's IDCT adds a few levels more; that is not what this CPU test checks.
DEVICE_TOLERANCE = 1.01


def picture(width=120, height=90, seed=0) -> Image.Image:
    """Gradients plus noise: every crop differs from its neighbours, so a wrong box shows."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + g.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def make_odd_folder(root):
    """root/train/{a,b}/ holding each kind of file once or twice; returns root."""
    for c, seed in (("a", 0), ("b", 10)):
        folder = root / "train" / c
        folder.mkdir(parents=True)
        rgb = picture(seed=seed)
        rgb.save(folder / "rgb.jpg", quality=90)
        rgb.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "upper.JPG", quality=90)
        rgb.convert("L").save(folder / "gray.jpg", quality=90)
        picture(100, 80, seed + 1).save(folder / "progressive.jpg", quality=90, progressive=True)
        picture(90, 120, seed + 2).save(folder / "png_named.JPEG", format="PNG")  # ImageNet's n02105855_2933
        picture(110, 70, seed + 3).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
        rgba = picture(80, 100, seed + 4).convert("RGBA")
        rgba.putalpha(128)
        rgba.save(folder / "rgba.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_odd_folder(tmp_path_factory.mktemp("odd"))


def samples_of(folder):
    from distributed_step.data.images import list_image_folder

    classes, samples = list_image_folder(str(folder / "train"), f"imagefolder:{folder}")
    assert classes == ["a", "b"] and sorted({p.rsplit("/", 1)[1] for p, _ in samples}) == sorted(KINDS)
    return samples


def kind_of(path: str) -> str:
    return KINDS[path.rsplit("/", 1)[1]]


def test_the_header_says_which_files_the_device_decoder_takes(folder):
    for path, _ in samples_of(folder):
        with open(path, "rb") as fh:
            frame = read_frame(fh.read())
        if path.endswith((".png", ".JPEG")):
            assert frame is None, path  # not a JPEG, whatever its name
            continue
        with Image.open(path) as image:
            assert (frame.width, frame.height) == image.size, path  # the box is drawn from these
            assert frame.components == len(image.getbands()), path
        assert frame.device_decodable == (kind_of(path) == "device"), path
    assert read_frame(b"\xff\xd8\xff") is None and read_frame(b"") is None  # truncated: left to the worker


@pytest.mark.parametrize("train", [True, False])
def test_a_mixed_batch_equals_the_workers_decode_sample_by_sample(folder, train):
    samples = samples_of(folder)
    workers = ImageFiles(samples, SIZE, seed=4, train=train)
    device = ImageFiles(samples, SIZE, seed=4, train=train, on_device=True)
    keys = [(3, i) for i in range(len(samples))]
    items, labels, params = collate_encoded([device[k] for k in keys])
    for item, (path, _) in zip(items, samples):  # bytes for the device, a uint8 crop from the worker
        assert (item.dim(), item.dtype) == ((1, torch.uint8) if kind_of(path) == "device" else
                                            (3, torch.uint8)), path
    crops, counts = decode_crops(items, params, SIZE, torch.device("cpu"), samples)
    assert crops.shape == (len(samples), 3, SIZE, SIZE) and crops.dtype == torch.float32
    assert (counts.device, counts.workers, counts.cpu) == (8, 6, [])
    for k, (key, (path, label)) in enumerate(zip(keys, samples)):
        expected, expected_label, expected_params = workers[key]
        assert labels[k] == expected_label == label and params[k, 2] == expected_params[2]  # the same flip
        diff = (crops[k] - expected.float()).abs().max().item()
        if kind_of(path) == "worker":
            assert diff == 0, path  # the same function decoded it
        else:
            assert diff <= DEVICE_TOLERANCE, (path, diff)


def test_a_file_the_device_decoder_refuses_is_decoded_on_the_cpu_and_counted(folder, monkeypatch, caplog):
    """A file that passed the header check but that decode_jpeg raises on (nvjpeg refuses some
    files libjpeg-turbo takes): the batch survives, the file is decoded on the host, named once."""
    import torchvision.io

    samples = samples_of(folder)
    refused = next(i for i, (path, _) in enumerate(samples) if path.endswith("a/gray.jpg"))
    refused_bytes = (folder / "train" / "a" / "gray.jpg").read_bytes()
    real = torchvision.io.decode_jpeg

    def picky(data, **kw):
        for item in data if isinstance(data, list) else [data]:
            if bytes(item.numpy()) == refused_bytes:
                raise RuntimeError("nvjpeg: unsupported JPEG (simulated)")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    device = ImageFiles(samples, SIZE, seed=4, train=True, on_device=True)
    batch = collate_encoded([device[(0, i)] for i in range(len(samples))])
    feed = DeviceFeed(DeviceTransform(IMAGENET_MEAN, IMAGENET_STD, SIZE, flip=True), torch.device("cpu"),
                      channels_last=False, samples=samples)
    with caplog.at_level(logging.INFO, logger="distributed_step"):
        (x, _), = list(feed([batch]))
    assert x.shape == (len(samples), 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert feed.decoded == {"device": 7, "workers": 6, "cpu": 1}
    crops, counts = decode_crops(*batch[::2], SIZE, torch.device("cpu"), samples)
    assert counts.cpu[0][0] == samples[refused][0] and "simulated" in counts.cpu[0][1]
    expected = ImageFiles(samples, SIZE, seed=4, train=True)[(0, refused)][0]
    assert torch.equal(crops[refused], expected.float())  # the workers' own decode of the same box
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"refused {samples[refused][0]}" in warned[0], warned


def test_the_run_logs_once_how_many_files_took_the_worker_path(folder, caplog):
    samples = samples_of(folder)
    device = ImageFiles(samples, SIZE, seed=0, train=True, on_device=True)
    batches = [collate_encoded([device[(0, i)] for i in range(j, j + 7)]) for j in (0, 7)]
    feed = DeviceFeed(DeviceTransform(IMAGENET_MEAN, IMAGENET_STD, SIZE, flip=True), torch.device("cpu"),
                      channels_last=False, samples=samples)
    with caplog.at_level(logging.INFO, logger="distributed_step"):
        for _ in range(2):  # two epochs: one line, after the first
            assert len(list(feed(batches))) == 2
        next(feed(batches))  # a pass stopped early (a stop request) logs nothing more either
    lines = [r.getMessage() for r in caplog.records if "--decode device" in r.getMessage()]
    assert lines == [(f"--decode device: 6 of the 14 files rank 0 read from {folder}/train in its first pass were "
                      "decoded in the loader workers (not JPEGs the device decoder takes: PNG, CMYK, ...), 0 on "
                      "the CPU after the device decoder refused them")]
    # Since the start, on this rank: two passes, then class a's 7 files (4 JPEGs for the device).
    assert feed.decoded == {"device": 8 * 2 + 4, "workers": 6 * 2 + 3, "cpu": 0}


@pytest.mark.slow  # one real training process: ~9 s here, most of it imports
def test_train_with_decode_device_on_odd_files(folder, tmp_path):
    """The whole command, one process: before, it stopped at the first batch holding the PNG.
    --workers 0 saves a worker's start (~6 s of imports); a worker returns the same list of
    tensors (tests/integration/test_options.py runs --decode device with workers)."""
    out = tmp_path / "run"
    proc = run_ok(python_cmd(["--data", f"imagefolder:{folder}", "--decode", "device", "--image-size", "32",
                              "--global-batch-size", "7", "--steps", "2", "--workers", "0", "--warmup-steps", "0",
                              "--log-every", "1", "--checkpoint-every", "0", "--out", str(out)]), timeout=120)
    assert f"6 of the 14 files rank 0 read from {folder}/train" in proc.output, proc.output[-3000:]
    assert "decodes JPEG files only" not in proc.output
