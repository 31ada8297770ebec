"""A profile from a model's structure, for runs nobody here measured (the published ones).

Backward produces each parameter's gradient once it has gone back through that parameter's
layer, so the gradients arrive in reverse layer order, and the time between two arrivals is the
backward work of the layers between them. That work is about twice the layer's forward FLOPs
for convolutions and linear layers, and the others (norms, activations, pooling) add little. One
forward pass on meta tensors, which have shapes but no data, gives every layer's FLOPs at the
real image size in no time, so a 224 px VGG-16 costs nothing to profile.
"""
from __future__ import annotations

import torch
from torch import nn

from distributed_step.planner.step_model import Profile


def layer_flops(model: nn.Module, image_size: int) -> list[tuple[nn.Module, float]]:
    """(layer, forward FLOPs for one image) of every layer that holds parameters, in forward order.
    Leaves `model` on the meta device."""
    found: list[tuple[nn.Module, float]] = []

    def record(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = 2 * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            found.append((module, float(per_output * output[0].numel())))
        elif isinstance(module, nn.Linear):
            found.append((module, float(2 * module.in_features * module.out_features)))
        elif any(p.requires_grad for p in module.parameters(recurse=False)):
            found.append((module, float(2 * output[0].numel())))  # a norm: a few operations per element

    hooks = [m.register_forward_hook(record) for m in model.modules() if list(m.parameters(recurse=False))]
    training = model.training
    try:  # in eval mode: a norm in training refuses one image at 1x1 (a small image's last stage)
        with torch.no_grad():
            model.to("meta").eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return found


def structural_profile(arch: str, model: nn.Module, image_size: int, batch: int, forward_s: float,
                       backward_s: float, optimizer_s: float, layers=None, **rest) -> Profile:
    """A Profile whose gradients arrive as the layers' backward FLOPs say, fp32 gradients
    (`layers`: layer_flops(model, image_size), when already known)."""
    layers = layers or layer_flops(model, image_size)
    seen = {id(m) for m, _ in layers}
    missing = [n for n, m in model.named_modules() if list(m.parameters(recurse=False)) and id(m) not in seen]
    if missing:
        raise ValueError(f"{arch}: layers with parameters that forward never ran: {missing[:3]}")
    total = sum(f for _, f in layers)
    sizes, ready, done = [], [], 0.0
    for module, flops in reversed(layers):
        done += flops
        for param in reversed(list(module.parameters(recurse=False))):
            sizes.append(param.numel() * 4)
            ready.append(done / total)
    return Profile(arch, batch, forward_s, backward_s, optimizer_s, tuple(sizes), tuple(ready), **rest)
