"""Data order, sharding and held-out splits, checked in-process (no process group needed)."""
import itertools

import pytest
import torch

from distributed_step.config import TrainConfig
from distributed_step.data.datasets import DIGITS_HELD_OUT, SYNTHETIC_HELD_OUT, SyntheticImages, build_datasets
from distributed_step.data.loaders import ResumableSampler, held_out_loader


def global_batches(dataset, world, batch, epoch, skip=0):
    """The k-th global batch = the union of every rank's k-th batch."""
    shards = []
    for rank in range(world):
        sampler = ResumableSampler(dataset, world, rank, seed=3, batch_per_rank=batch // world)
        sampler.set_position(epoch, skip)
        keys = list(sampler)
        assert {epoch_of for epoch_of, _ in keys} == {epoch}  # each key carries its epoch to the workers
        idx = [i for _, i in keys]
        shards.append([idx[i:i + batch // world] for i in range(0, len(idx) - batch // world + 1, batch // world)])
    return [sorted(itertools.chain.from_iterable(s[k] for s in shards)) for k in range(len(shards[0]))]


def test_global_batch_is_the_same_whatever_the_world_size():
    data = SyntheticImages(50, 8, seed=0)  # 50 is not a multiple of 4: drop_last must not skew
    one, two, four = (global_batches(data, w, 8, epoch=0) for w in (1, 2, 4))
    assert one == two == four and len(one) == 50 // 8


def test_epochs_are_shuffled_differently_and_resume_skips_exactly():
    data = SyntheticImages(48, 8, seed=0)
    epoch0, epoch1 = global_batches(data, 2, 8, 0), global_batches(data, 2, 8, 1)
    assert epoch0 != epoch1  # set_epoch reshuffles
    assert global_batches(data, 2, 8, 1, skip=2) == epoch1[2:]  # mid-epoch resume position


def test_synthetic_sample_depends_only_on_seed_and_index():
    a, b = SyntheticImages(10, 16, seed=1), SyntheticImages(10, 16, seed=1)
    assert torch.equal(a[7][0], b[7][0]) and a[7][1] == b[7][1] and a[7][0].dtype == torch.uint8
    assert torch.equal(a[(3, 7)][0], a[7][0])  # the epoch does not change a synthetic sample
    assert not torch.equal(a[7][0], SyntheticImages(10, 16, seed=2)[7][0])
    assert not torch.equal(a[7][0], a[8][0])
    many = SyntheticImages(2000, 4, seed=0)
    labels = {many[i][1] for i in range(2000)}
    assert labels == set(range(10))


def test_held_out_shards_cover_every_sample_once():
    sets = build_datasets(TrainConfig(data="synthetic", image_size=8))
    assert SYNTHETIC_HELD_OUT % 2 == 1
    seen = []
    for rank in range(2):
        for images, _, _ in held_out_loader(sets, 32, rank, 2, 0, False):
            seen.extend(images[:, 0, 0, 0].tolist())
    full = [float(sets.held_out[i][0][0, 0, 0]) for i in range(SYNTHETIC_HELD_OUT)]
    assert sorted(seen) == sorted(full)


def test_digits_is_real_and_split_is_fixed():
    a = build_datasets(TrainConfig(data="digits", image_size=32, seed=0))
    b = build_datasets(TrainConfig(data="digits", image_size=32, seed=9))
    assert len(a.held_out) == DIGITS_HELD_OUT and len(a.train) == 1797 - DIGITS_HELD_OUT
    image, label, params = a.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and 0 <= label < 10
    assert params.tolist() == [0, 0, 0]
    assert torch.equal(a.held_out[5][0], b.held_out[5][0])  # --seed does not move the split
    assert sorted({int(a.train[i][1]) for i in range(len(a.train))}) == list(range(10))


def test_unreadable_image_and_empty_class_name_the_file_and_the_split(tmp_path):
    from PIL import Image

    from distributed_step.config import ConfigError
    from distributed_step.data.datasets import build_datasets
    from distributed_step.data.images import UnreadableImage

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (12, 12), (40, 80, 120)).save(tmp_path / split / c / "0.png")
    (tmp_path / "train" / "a" / "zero.jpg").write_bytes(b"")
    sets = build_datasets(TrainConfig(data=f"imagefolder:{tmp_path}", image_size=8))
    bad = next(i for i, (path, _) in enumerate(sets.train.samples) if path.endswith("zero.jpg"))
    with pytest.raises(UnreadableImage, match=f"unreadable image {tmp_path}/train/a/zero.jpg"):
        sets.train[bad]
    (tmp_path / "val" / "b" / "0.png").unlink()  # an empty class folder in val/
    with pytest.raises(ConfigError, match=r"val/: Found no valid file for the classes b"):
        build_datasets(TrainConfig(data=f"imagefolder:{tmp_path}", image_size=8))


def test_cifar10_names_the_missing_or_corrupt_file(tmp_path):
    from torchvision.datasets import CIFAR10

    from distributed_step.config import ConfigError
    from distributed_step.data.datasets import build_datasets

    folder = tmp_path / CIFAR10.base_folder
    folder.mkdir()
    with pytest.raises(ConfigError, match=f"{folder}/data_batch_1 is missing"):
        build_datasets(TrainConfig(data=f"cifar10:{tmp_path}"))
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        (folder / name).write_bytes(b"not the real batch")
    with pytest.raises(ConfigError, match=f"{folder}/data_batch_1 is corrupt"):
        build_datasets(TrainConfig(data=f"cifar10:{tmp_path}"))
