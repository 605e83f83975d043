"""Plain PyTorch networks for hierarchical polynomial regression.

``ThreeLayerNetwork`` is the architecture of the layerwise method:

    phi(x) = sigma2(V x) / sqrt(m2)        V: (m2, d) frozen, rows uniform on the sphere
    f(x)   = c + sum_i a_i * sigma1(<w_i, phi(x)> + b_i)

(phi is optionally centred over its m2 units, see ``RandomFeatures``.)

Only W = (w_i), b, a and c are trainable. ``RandomFeatures`` on its own, followed by a
ridge-fitted linear layer, is the random-feature kernel baseline.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from zoo.polynomials.hermite import get_activation

__all__ = ["RandomFeatures", "ThreeLayerNetwork", "TwoLayerNetwork", "num_degree_features"]


def num_degree_features(input_dim: int, degree: int) -> int:
    """Return the number of monomials of exactly ``degree`` in ``input_dim`` variables.

    This is the dimension of the space that contains the degree-k part of the target, so a
    random-feature layer narrower than this cannot represent a generic degree-k feature.
    """
    return math.comb(input_dim + degree - 1, degree)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")


class RandomFeatures(nn.Module):
    """Frozen random features ``sigma(V x) / sqrt(m)`` with rows of V uniform on the sphere.

    Each row has unit norm, so ``<v, x>`` is N(0, 1) for x ~ N(0, I_d) and the Hermite
    expansion of the activation describes the features.

    With ``center=True`` each sample's features have their mean over the m units
    subtracted. That removes the component that all units share: for ``He_2`` features
    it is ``(|x|^2 - d) / d``, whose kernel eigenvalue is about d/2 times that of the
    degree-2 harmonics, so without centring it amplifies the sampling noise of the
    one-step feature estimate (it roughly halves the samples needed at d = 16, k = 2).
    Centring is this project's addition to the architecture of Wang, Nichani and Lee.

    Args:
        input_dim: Input dimension d.
        num_features: Number m of random features.
        activation: Name of the activation, a key of ``zoo.polynomials.hermite.ACTIVATIONS``.
        seed: Seed for V.
        center: Subtract the mean over units from each sample's features.
    """

    def __init__(
        self, input_dim: int, num_features: int, activation: str, seed: int, center: bool = False
    ) -> None:
        super().__init__()
        self.center = center
        _check_positive_int("input_dim", input_dim)
        _check_positive_int("num_features", num_features)
        self.activation_name = activation
        self.activation = get_activation(activation)
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(num_features, input_dim, generator=generator)
        weight = weight / weight.norm(dim=1, keepdim=True)
        self.register_buffer("weight", weight)

    @property
    def num_features(self) -> int:
        """Number m of random features."""
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(n, d)`` to features ``(n, m)``."""
        features = self.activation(x @ self.weight.T)
        scale = 1.0 / math.sqrt(self.num_features)
        if features.requires_grad:
            if self.center:
                features = features - features.mean(dim=1, keepdim=True)
            return features * scale
        # No autograd graph to keep: update in place, since this matrix is the largest.
        if self.center:
            features.sub_(features.mean(dim=1, keepdim=True))
        return features.mul_(scale)


class ThreeLayerNetwork(nn.Module):
    """Three-layer network with a frozen random first layer.

    At construction W = 0, ``a_i`` is uniform on ``{-1/m1, +1/m1}``, ``b_i`` is uniform on
    [0, 1] (so ReLU neurons start in their linear region and all receive a gradient in the
    first step) and c = 0.

    Args:
        input_dim: Input dimension d.
        feature_width: Number m2 of frozen random features.
        hidden_width: Number m1 of trained middle neurons.
        feature_activation: Activation sigma2 of the frozen layer.
        activation: Activation sigma1 of the middle layer.
        seed: Seed for V, a and b.
        center_features: Centre the frozen features over units (see ``RandomFeatures``).
    """

    def __init__(
        self,
        input_dim: int,
        feature_width: int,
        hidden_width: int,
        feature_activation: str = "hermite2",
        activation: str = "relu",
        seed: int = 0,
        center_features: bool = True,
    ) -> None:
        super().__init__()
        _check_positive_int("hidden_width", hidden_width)
        self.random_features = RandomFeatures(
            input_dim, feature_width, feature_activation, seed, center=center_features
        )
        self.activation_name = activation
        self.activation = get_activation(activation)
        generator = torch.Generator().manual_seed(seed + 1)
        signs = torch.randint(0, 2, (hidden_width,), generator=generator) * 2.0 - 1.0
        self.weight = nn.Parameter(torch.zeros(hidden_width, feature_width))
        self.bias = nn.Parameter(torch.rand(hidden_width, generator=generator))
        self.outer_weight = nn.Parameter(signs / hidden_width)
        self.outer_bias = nn.Parameter(torch.zeros(()))

    def preactivations(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, with_bias: bool = True
    ) -> torch.Tensor:
        """Return ``<w_i, phi(x)> (+ b_i)`` for a batch, shape ``(n, m1)``.

        Args:
            x: Inputs ``(n, d)``.
            weight: Middle-layer weight to use in place of ``self.weight`` (for functional
                gradients).
            with_bias: Add the biases ``b_i``.
        """
        weight = self.weight if weight is None else weight
        values = self.random_features(x) @ weight.T
        return values + self.bias if with_bias else values

    def hidden(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Return the middle-layer activations ``sigma1(W phi(x) + b)``, shape ``(n, m1)``."""
        return self.activation(self.preactivations(x, weight))

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Return the network output ``f(x)``, shape ``(n,)``."""
        return self.hidden(x, weight) @ self.outer_weight + self.outer_bias


class TwoLayerNetwork(nn.Module):
    """Two-layer network ``f(x) = a^T sigma(W x + b) + c``, all layers trained.

    Args:
        input_dim: Input dimension d.
        hidden_width: Number of hidden neurons.
        activation: Name of the hidden activation.
    """

    def __init__(self, input_dim: int, hidden_width: int, activation: str = "relu") -> None:
        super().__init__()
        _check_positive_int("input_dim", input_dim)
        _check_positive_int("hidden_width", hidden_width)
        self.activation = get_activation(activation)
        self.hidden_layer = nn.Linear(input_dim, hidden_width)
        self.output_layer = nn.Linear(hidden_width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``f(x)``, shape ``(n,)``."""
        return self.output_layer(self.activation(self.hidden_layer(x))).squeeze(-1)
