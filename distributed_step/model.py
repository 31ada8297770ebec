"""build_model(): a torchvision ResNet-18. Knows nothing of ranks or process groups."""
from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from distributed_step.config import ConfigError


def build_model(num_classes: int, *, weights: str = "none", small_input_stem: bool = False,
                channels_last: bool = False) -> nn.Module:
    """SyncBatchNorm is a distribution concern: see syncbn.convert_sync_batchnorm."""
    model = _with_weights(weights, num_classes)
    if small_input_stem:
        # On 32 px inputs the 7x7/2 stem plus max-pool leaves a 1x1 map before the last stage;
        # the CIFAR-style 3x3/1 stem keeps 4x4. Pretrained conv1 weights do not carry over.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _with_weights(weights: str, num_classes: int) -> nn.Module:
    if weights == "none":
        return resnet18(num_classes=num_classes)
    if weights == "DEFAULT":
        state = _cached_torchvision_weights()
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise ConfigError(f"--weights {weights}: not a readable state dict ({exc})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ConfigError(f"--weights {weights}: not a ResNet-18 state dict (no fc.weight)")
    model = resnet18(num_classes=state["fc.weight"].shape[0])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"--weights {weights}: {str(exc).splitlines()[0]}") from None
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)  # a new head for the new classes
    return model


def _cached_torchvision_weights() -> dict:
    """torchvision's DEFAULT ResNet-18 weights, from its cache only: runs never download."""
    url = ResNet18_Weights.DEFAULT.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        raise ConfigError(f"--weights DEFAULT: {path} is not in torchvision's cache; place the file "
                          f"there (set TORCH_HOME to move the cache) or pass --weights PATH")
    return torch.load(path, map_location="cpu", weights_only=True)
