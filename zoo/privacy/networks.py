"""Small networks for private training, chosen by name so configs hold plain values only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

#: Activation modules by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
#: Normalization layers for the convolutional network by name.
NORMALIZATIONS: tuple[str, ...] = ("none", "group", "batch")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


def _normalization(name: str, channels: int) -> list[nn.Module]:
    if name == "none":
        return []
    if name == "group":
        return [nn.GroupNorm(min(8, channels), channels)]
    if name == "batch":
        return [nn.BatchNorm2d(channels)]
    raise ValueError(f"Unknown normalization {name!r}; choose one of {', '.join(NORMALIZATIONS)}.")


def mnist_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    activation: str = "tanh",
    normalization: str = "none",
) -> nn.Sequential:
    """Build the two-convolution network for 28 x 28 images used in DP-SGD studies.

    The layout (8x8 and 4x4 convolutions with stride 2, 2x2 max-pooling with stride 1, a
    32-unit hidden layer, tanh) follows Papernot et al., "Tempered Sigmoid Activations for
    Deep Learning with Differential Privacy", AAAI 2021, which found tanh better than ReLU
    under DP-SGD. ``normalization="batch"`` adds BatchNorm, which Opacus cannot train; it
    exists to exercise the automatic replacement.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=8, stride=2, padding=3),
        *_normalization(normalization, 16),
        _activation(activation),
        nn.MaxPool2d(kernel_size=2, stride=1),
        nn.Conv2d(16, 32, kernel_size=4, stride=2),
        *_normalization(normalization, 32),
        _activation(activation),
        nn.MaxPool2d(kernel_size=2, stride=1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        _activation(activation),
        nn.Linear(32, num_classes),
    )


def mlp(
    in_features: int,
    num_classes: int = 2,
    hidden: Sequence[int] = (64,),
    activation: str = "tanh",
) -> nn.Sequential:
    """Build a fully connected network ``in_features -> hidden... -> num_classes``."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), _activation(activation)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


#: Network builders by name.
NETWORKS = {"mnist_cnn": mnist_cnn, "mlp": mlp}


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build the network ``name`` from :data:`NETWORKS` with keyword arguments ``kwargs``.

    Raises:
        ValueError: for an unknown name.
        TypeError: for keyword arguments the builder does not accept.
    """
    if name not in NETWORKS:
        raise ValueError(f"Unknown network {name!r}; choose one of {', '.join(NETWORKS)}.")
    return NETWORKS[name](**kwargs)
