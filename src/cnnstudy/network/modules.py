"""The network: torch modules built from the architecture plan, layer for layer."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from cnnstudy.network.cpu_kernels import PoolMax2d, conv_max_pool
from cnnstudy.network.plan import Layer

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class FlattenHWC(nn.Module):
    """(N, C, *axes) feature maps to (N, axes*C) vectors, channels last: for images
    height, width, channel order, the order of describe's HxWxC shapes, and of memory in
    channels_last maps, the layout the convolutions run in. There flattening is a free
    view, and its gradient keeps the maps' layout; nn.Flatten's channel-first order would
    copy the maps forward and hand the layers below a gradient in the other layout (a slow
    mixed-layout backward). Sequences and volumes flatten in the same order (L x C,
    D x H x W x C).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(1, -1).flatten(1)


def _plain_relu(module: nn.Module | None) -> bool:
    return type(module) is nn.ReLU and not (module._forward_hooks or module._forward_pre_hooks)


class Network(nn.Sequential):
    """nn.Sequential that runs a first conv, the 2x2 max pool after it and the ReLU after
    that as one CPU kernel where `conv_max_pool` applies (cpu_kernels.py); module by module
    everywhere else. Modules, names and state dict are the Sequential's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            if i + 1 < len(modules) and isinstance(modules[i], nn.Conv2d):
                relu = _plain_relu(modules[i + 2] if i + 2 < len(modules) else None)
                fused = conv_max_pool(modules[i], modules[i + 1], x, relu)
                if fused is not None:
                    x = fused
                    i += 3 if relu else 2
                    continue
            x = modules[i](x)
            i += 1
        return x


def build_network(layers: list[Layer], cpu_kernels: bool = True) -> Network:
    """An nn.Sequential whose modules carry the plan's layer names (conv1, pool1, fc1, output).

    Max pools are `PoolMax2d`: nn.MaxPool2d, running cnnstudy's vectorized CPU kernel where
    it applies, and a first conv with the max pool after it runs fused (`Network`), unless
    cpu_kernels=False (cpu_kernels.py).

    The output layer yields logits; the softmax is part of the loss (cross-entropy).
    Max pooling commutes with every activation offered (all are non-decreasing), so the
    activation of the conv before a max pool runs after it, on a quarter of the values:
    the same numbers, forward and backward, for much less memory traffic.
    """
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for layer in layers:
        dims = layer.dims
        if layer.kind == "conv":
            out_c, in_c, *field = layer.weight_shape
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
            modules[layer.name] = conv(in_c, out_c, tuple(field), layer.stride, layer.padding)
        elif layer.kind == "pool":
            deferred = None
            if layer.activation == "max":
                if dims == 2:  # cnnstudy's CPU kernels are for 2D maps only
                    pool = PoolMax2d(layer.receptive_field, layer.stride, cpu_kernel=cpu_kernels)
                else:
                    pool = {1: nn.MaxPool1d, 3: nn.MaxPool3d}[dims](
                        layer.receptive_field, layer.stride
                    )
                if isinstance(next(reversed(modules.values()), None), tuple(_ACTIVATIONS.values())):
                    deferred = modules.popitem()  # the conv's activation, moved after the pool
            else:
                avg = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims]
                pool = avg(layer.receptive_field, layer.stride)
            modules[layer.name] = pool
            if deferred:
                modules[deferred[0]] = deferred[1]
        elif layer.kind == "dropout":
            modules[layer.name] = nn.Dropout(layer.dropout)
        elif layer.kind == "flatten":
            modules[layer.name] = FlattenHWC()
        elif layer.kind in ("fc", "output"):
            out_f, in_f = layer.weight_shape
            modules[layer.name] = nn.Linear(in_f, out_f)
        if layer.kind in ("conv", "fc") and layer.activation in _ACTIVATIONS:
            modules[f"{layer.name}_{layer.activation}"] = _ACTIVATIONS[layer.activation]()
    return Network(modules)
