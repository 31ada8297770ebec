"""The other knobs, exercised together in one 2-rank run on an ImageFolder the test writes:
bf16 autocast, channels_last, gradient accumulation (no_sync), clipping, label smoothing,
Nesterov, the step schedule, periodic evaluation, and --weights PATH with a new head."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from PIL import Image
from torchvision.models import resnet18

from distributed_step.config import ConfigError, TrainConfig
from distributed_step.data.datasets import build_datasets
from distributed_step.model import build_model
from distributed_step.parallel.process_group import state_digest
from tests.helpers import TINY, load_weights, metrics, python_cmd, run_ok, summary, torchrun_cmd

pytestmark = pytest.mark.slow


def make_image_folder(root, classes=3, per_class=12, size=40):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class if split == "train" else 5):
                pixels = (torch.rand(size, size, 3, generator=g) * 80 + 60 * c).clamp(0, 255).byte()
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg", quality=95)
    return root


def test_many_options_together_on_an_image_folder(tmp_path):
    """Train and held-out JPEGs decoded batch-wise where the model runs (--decode device)."""
    data = make_image_folder(tmp_path / "images")
    weights = tmp_path / "imagenet_like.pt"
    torch.save(resnet18(num_classes=1000).state_dict(), weights)
    out = tmp_path / "run"
    run_ok(torchrun_cmd(2, ["--data", f"imagefolder:{data}", "--image-size", "32", "--global-batch-size", "8",
                            "--steps", "6", "--precision", "bf16", "--channels-last", "--grad-accum", "2",
                            "--clip-grad", "1.0", "--label-smoothing", "0.1", "--nesterov", "--schedule", "step",
                            "--warmup-steps", "0", "--lr", "0.01", "--weights", str(weights), "--eval-every", "2",
                            "--log-every", "1", "--workers", "1", "--checkpoint-every", "0", "--decode", "device",
                            "--comm-hook", "auto", "--out", str(out)]))
    result = summary(out)
    final = load_weights(out / "model.pt")
    assert final["fc.weight"].shape == (3, 512)              # the 1000-class head was replaced
    assert result["replica_digests"] == [state_digest(final)] * 2
    assert result["eval_samples"] == 15
    logged = metrics(out)
    assert [m["step"] for m in logged if "eval_accuracy" in m] == [2, 4, 6]  # 6: the final evaluation
    lrs = [m["lr"] for m in logged if "lr" in m]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.0001)  # /10 at 1/3 and 2/3
    # --comm-hook auto measured once (a bf16, channels_last, accumulated step) and chose by its rule
    chosen = [m for m in logged if "comm_hook" in m]
    assert len(chosen) == 1 and chosen[0]["step"] == 0
    assert (chosen[0]["link_exposed_share"] > 0.05) == (chosen[0]["comm_hook"] == "bf16"), chosen
    assert yaml.safe_load((out / "config.yaml").read_text())["comm_hook_chosen"] == chosen[0]["comm_hook"]
    # resumed on as many ranks, the run keeps its arithmetic: no second measurement, the same hook
    resumed = run_ok(torchrun_cmd(2, ["--data", f"imagefolder:{data}", "--image-size", "32", "--global-batch-size",
                                      "8", "--steps", "7", "--grad-accum", "2", "--warmup-steps", "0", "--workers", "1",
                                      "--comm-hook", "auto", "--out", str(out)]))
    assert "resumed from" in resumed.output and "comm hook auto" not in resumed.output
    assert [m for m in metrics(out) if "comm_hook" in m] == chosen
    assert yaml.safe_load((out / "config.yaml").read_text())["comm_hook_chosen"] == chosen[0]["comm_hook"]


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    data = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    cfg = TrainConfig(data=f"imagefolder:{data}", image_size=16)
    a, b = build_datasets(cfg).train, build_datasets(cfg).train
    assert torch.equal(a[(0, 1)][0], b[(0, 1)][0]) and torch.equal(a[(0, 1)][2], b[(0, 1)][2])
    assert not torch.equal(a[(0, 1)][0], b[(1, 1)][0])  # another epoch, another crop


def test_default_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="not in torchvision's cache"):
        build_model(10, weights="DEFAULT")


def test_cifar10_without_files_names_the_directory(tmp_path):
    with pytest.raises(ConfigError, match=f"--data cifar10:{tmp_path}"):
        build_datasets(TrainConfig(data=f"cifar10:{tmp_path}"))


def test_compiled_model_trains_and_saves_plain_weights(tmp_path):
    """--compile (torch.compile, ~1 minute of compiling on 2 cores): model.pt keeps torchvision's keys."""
    out = tmp_path / "compiled"
    run_ok(python_cmd(TINY + ["--steps", "3", "--compile", "--checkpoint-every", "0", "--out", str(out)]), timeout=600)
    assert summary(out)["steps"] == 3
    plain = resnet18(num_classes=10)
    plain.load_state_dict(load_weights(out / "model.pt"))  # no "_orig_mod." prefixes


def test_fp16_trains_on_cpu_with_its_scaler_saved_and_resumed(tmp_path):
    """--precision fp16 with the default --fused-sgd: the path that went NaN on GPU, on CPU."""
    out = tmp_path / "fp16"
    flags = TINY + ["--precision", "fp16", "--lr", "0.05", "--checkpoint-every", "2", "--out", str(out)]
    run_ok(python_cmd(flags + ["--steps", "2"]))
    first = torch.load(out / "checkpoints" / "step_00000002.pt", map_location="cpu", weights_only=True)
    assert first["scaler"] and first["scaler"]["scale"] < 65536.0  # overflowing steps were skipped
    resumed = run_ok(python_cmd(flags + ["--steps", "5"]))
    assert "resumed from" in resumed.output
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in metrics(out) if "loss" in m] == list(range(1, 6))
    assert all(math.isfinite(loss) and loss < 10 for loss in losses), losses
    assert summary(out)["status"] == "complete"
