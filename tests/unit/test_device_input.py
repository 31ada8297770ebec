"""uint8 batches to the model's input (device_input.py, images.py, step_flags.py), on CPU tensors:
the same code a GPU runs, checked against per-sample torchvision references."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from distributed_step.data.datasets import IMAGENET_MEAN, IMAGENET_STD, CifarImages
from distributed_step.data.device_input import DeviceFeed, DeviceTransform
from distributed_step.data.images import ImageFiles
from distributed_step.parallel.process_group import DistEnv
from distributed_step.parallel.step_flags import StepFlags


def photo(path, width=500, height=375, seed=0):
    """A JPEG with structure at every scale (gradients plus noise), like a photo's worth of detail."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + g.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def test_uint8_normalised_on_the_device_equals_the_float_path():
    g = np.random.default_rng(1)
    pils = [Image.fromarray(g.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(4)]
    float_path = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(p)) for p in pils])
    uint8 = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pils])
    transform = DeviceTransform(IMAGENET_MEAN, IMAGENET_STD, 24)
    out = transform(uint8, torch.zeros(4, 3, dtype=torch.int16))
    assert out.dtype == torch.float32 and torch.allclose(out, float_path, atol=1e-5)
    last = transform(uint8, torch.zeros(4, 3, dtype=torch.int16), channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)


def test_batched_crop_and_flip_equal_a_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    params = torch.stack([torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6,), generator=g),
                          torch.tensor([0, 1, 0, 1, 1, 0])], dim=1).to(torch.int16)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    for size in (32, 40):  # 40: resized on the device first, as Resize comes before RandomCrop
        pad = size // 8
        params[:, :2] = params[:, :2].clamp(max=2 * pad)
        out = DeviceTransform(mean, std, size, pad=pad, flip=True)(images, params)
        for i, (top, left, flip) in enumerate(params.tolist()):
            x = images[i].float()
            if size != 32:
                x = TF.resize(x, [size, size], antialias=True)
            x = TF.crop(TF.pad(x, [pad]), top, left, size, size)
            x = TF.horizontal_flip(x) if flip else x
            expected = TF.normalize(x / 255, list(mean), list(std))
            assert torch.allclose(out[i], expected, atol=1e-5), (size, i)


def test_cifar_params_come_from_seed_epoch_and_index():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    data = CifarImages(pixels, list(range(20)), seed=5, pad=4)
    image, label, params = data[(2, 7)]
    assert torch.equal(image, torch.from_numpy(pixels[7]).permute(2, 0, 1)) and label == 7
    assert torch.equal(params, data[(2, 7)][2]) and 0 <= params[:2].min() and params[:2].max() <= 8
    drawn = {tuple(data[(epoch, 7)][2].tolist()) for epoch in range(12)}
    assert len(drawn) > 6  # another epoch, another crop
    assert CifarImages(pixels, list(range(20)), seed=5, pad=0)[3][2].tolist() == [0, 0, 0]


def test_reduced_jpeg_decode_matches_the_full_decode(tmp_path):
    samples = [(str(photo(tmp_path / f"{i}.jpg", seed=i)), i % 2) for i in range(4)]
    for train in (True, False):
        reduced = ImageFiles(samples, 64, seed=3, train=train)
        full = ImageFiles(samples, 64, seed=3, train=train, reduced_decode=False)
        for key in [(0, 0), (0, 1), (1, 2), (4, 3)]:
            a, label, params = reduced[key]
            b, _, params_b = full[key]
            assert a.shape == (3, 64, 64) and a.dtype == torch.uint8 and label == key[1] % 2
            assert torch.equal(params, params_b)  # the same box and flip, whatever the decode
            # Same picture: DCT-domain downscaling differs from PIL's resampling by a few levels.
            assert (a.float() - b.float()).abs().mean() < 6, key


def test_random_resized_box_stays_inside_and_depends_on_the_key(tmp_path):
    samples = [(str(photo(tmp_path / "a.jpg", width=80, height=50)), 0)]
    data = ImageFiles(samples, 16, seed=0, train=True)
    crops = [data[(epoch, 0)][0] for epoch in range(6)]
    assert torch.equal(crops[0], data[(0, 0)][0])
    assert len({c.float().mean().item() for c in crops}) == 6


def test_feed_yields_model_input_and_counts_the_wait():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    batches = [(images, torch.arange(4), torch.zeros(4, 3, dtype=torch.int16))] * 3
    feed = DeviceFeed(DeviceTransform((0.5,) * 3, (0.25,) * 3, 8), torch.device("cpu"), channels_last=False)
    out = list(feed(batches))
    assert len(out) == 3 and out[0][0].dtype == torch.float32 and torch.equal(out[0][1], torch.arange(4))
    assert torch.allclose(out[0][0], (images / 255 - 0.5) / 0.25, atol=1e-5)
    assert feed.take_wait_s() >= 0 and feed.wait_s == 0


def test_flags_are_read_a_step_late_unless_settled():
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                  backend="gloo", owns_group=False)
    flags = StepFlags(env)
    flags.post(1, True, torch.tensor(1.0))
    assert not flags.stop  # not read yet: the host did not wait for step 1
    flags.post(2, False, torch.tensor(float("nan")))
    assert flags.stop and flags.non_finite_step is None
    flags.settle()
    assert flags.non_finite_step == 2
    flags.post(3, False, torch.tensor(float("inf")))
    flags.settle()
    assert flags.non_finite_step == 2  # the first one is the one named


@pytest.mark.parametrize("size", [8, 32])
def test_synthetic_batches_normalise_to_zero_mean_unit_variance(size):
    from distributed_step.config import TrainConfig
    from distributed_step.data.datasets import build_datasets

    sets = build_datasets(TrainConfig(data="synthetic", image_size=size))
    batch = torch.stack([sets.train[i][0] for i in range(64)])
    x = sets.train_transform(batch, torch.zeros(64, 3, dtype=torch.int16))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05


def test_decode_on_the_device_equals_the_workers_decode(tmp_path):
    """--decode device: the files' bytes and boxes travel, the batch is decoded and cropped where
    the model runs (nvjpeg on CUDA; here the same code on CPU tensors)."""
    from distributed_step.data.images import UnreadableImage, collate_encoded

    samples = [(str(photo(tmp_path / f"{i}.jpg", width=120, height=90, seed=i)), i % 2) for i in range(4)]
    for train in (True, False):
        workers = ImageFiles(samples, 32, seed=1, train=train)
        device = ImageFiles(samples, 32, seed=1, train=train, on_device=True)
        keys = [(2, i) for i in range(4)]
        encoded, labels, params = collate_encoded([device[k] for k in keys])
        assert isinstance(encoded, list) and params.shape == (4, 8) and labels.tolist() == [0, 1, 0, 1]
        transform = DeviceTransform(IMAGENET_MEAN, IMAGENET_STD, 32, flip=train)
        feed = DeviceFeed(transform, torch.device("cpu"), channels_last=False, samples=samples)
        (on_device, _), = feed([(encoded, labels, params)])
        expected = transform(torch.stack([workers[k][0] for k in keys]),
                             torch.stack([workers[k][2] for k in keys]))
        assert torch.equal(params[:, 2], torch.stack([workers[k][2] for k in keys])[:, 2].int())  # same flips
        assert (on_device - expected).abs().mean() < 0.02  # the same crops, up to uint8 rounding
    whole = Path(samples[1][0]).read_bytes()
    (tmp_path / "0.jpg").write_bytes(whole[:len(whole) * 6 // 10])  # truncated: the header is intact
    encoded, labels, params = collate_encoded([device[(0, i)] for i in range(2)])
    # Refused on the device, then on the host too: the run stops naming it, as --decode workers does.
    with pytest.raises(UnreadableImage, match=f"unreadable image {tmp_path}/0.jpg"):
        list(feed([(encoded, labels, params)]))
    Image.new("RGB", (8, 8)).save(tmp_path / "png.png")  # not a JPEG: the worker decodes it (test_odd_files.py)
    crop, _, params = ImageFiles([(str(tmp_path / "png.png"), 0)], 8, seed=0, train=True, on_device=True)[0]
    assert crop.shape == (3, 8, 8) and crop.dtype == torch.uint8 and params.shape == (8,)


@pytest.mark.parametrize("fmt, mode", [("BMP", "RGB"), ("TIFF", "RGB"), ("PNG", "I;16"), ("PNG", "L")])
def test_formats_outside_torchvisions_decoders_still_load(tmp_path, fmt, mode):
    """ImageFolder lists BMP, TIFF, PPM...: those, and 16-bit PNGs, go through PIL."""
    pixels = np.arange(40 * 30, dtype=np.uint16 if mode == "I;16" else np.uint8).reshape(30, 40)
    image = Image.fromarray(pixels if mode != "RGB" else np.stack([pixels.astype(np.uint8)] * 3, -1))
    assert image.mode == mode
    path = tmp_path / f"x.{fmt.lower()}"
    image.save(path, format=fmt)
    crop, _, _ = ImageFiles([(str(path), 0)], 16, seed=0, train=False)[0]
    assert crop.shape == (3, 16, 16) and crop.dtype == torch.uint8


def test_bench_input_times_the_loader_and_its_baseline_and_refuses_bad_counts(tmp_path, capsys):
    from distributed_step.config import ConfigError
    from distributed_step.tools import bench

    assert bench.main(["--input", "--make-jpegs", str(tmp_path / "jpegs"), "--jpegs", "20", "--data",
                       f"imagefolder:{tmp_path / 'jpegs'}", "--image-size", "16", "--global-batch-size", "4",
                       "--worker-counts", "0", "--batches", "2", "--baseline"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("uint8", "full decode"))]
    assert len(rows) == 2 and all(float(row[-3]) > 0 for row in rows), out  # img/s of each variant
    assert "device transform on cpu" in out
    with pytest.raises(ConfigError, match="--worker-counts 'two'"):
        bench.main(["--input", "--worker-counts", "two"])
