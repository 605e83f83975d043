"""Normalised probabilists' Hermite polynomials and Hermite coefficients of activations.

The normalised Hermite polynomials ``He_j(z) / sqrt(j!)`` form an orthonormal basis of
L2(N(0, 1)). The layerwise method depends on which of these a function contains: the
frozen first-layer activation must carry the degree of the hidden feature, and the link
must have a non-zero degree-1 coefficient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial import hermite_e

__all__ = [
    "ACTIVATIONS",
    "get_activation",
    "hermite_coefficient",
    "normalized_hermite",
]


def normalized_hermite(degree: int, z: torch.Tensor) -> torch.Tensor:
    """Evaluate ``He_degree(z) / sqrt(degree!)`` by the three-term recurrence.

    Args:
        degree: Non-negative polynomial degree.
        z: Points at which to evaluate, any shape.

    Returns:
        A tensor of the same shape as ``z``.

    Raises:
        ValueError: If ``degree`` is negative.
    """
    if degree < 0:
        raise ValueError(f"Hermite degree must be >= 0, got degree={degree}.")
    # Closed forms for the common degrees: fewer passes over large feature matrices.
    if degree == 1:
        return z
    if degree == 2:
        return (z * z - 1.0) * (1.0 / math.sqrt(2.0))
    if degree == 3:
        return (z * z - 3.0) * z * (1.0 / math.sqrt(6.0))
    previous = torch.ones_like(z)
    if degree == 0:
        return previous
    current = z
    # He_{j+1}(z) = z He_j(z) - j He_{j-1}(z).
    for j in range(1, degree):
        previous, current = current, z * current - j * previous
    return current / math.sqrt(math.factorial(degree))


def _relu(z: torch.Tensor) -> torch.Tensor:
    return F.relu(z)


def _hermite_activation(degree: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def activation(z: torch.Tensor) -> torch.Tensor:
        return normalized_hermite(degree, z)

    return activation


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": _relu,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "hermite1": _hermite_activation(1),
    "hermite2": _hermite_activation(2),
    "hermite3": _hermite_activation(3),
    "hermite4": _hermite_activation(4),
}
"""Activation functions selectable by name. ``hermiteJ`` is ``He_J(z) / sqrt(J!)``."""


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Look up an activation function by name.

    Raises:
        ValueError: If ``name`` is not a key of :data:`ACTIVATIONS`.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def hermite_coefficient(
    function: Callable[[torch.Tensor], torch.Tensor], degree: int, num_points: int = 200
) -> float:
    """Compute ``E[function(z) He_degree(z) / sqrt(degree!)]`` for ``z ~ N(0, 1)``.

    Uses Gauss-Hermite quadrature with ``num_points`` nodes, which is exact for polynomials
    of degree below ``2 * num_points - degree``. For a kink such as ReLU's the error at the
    default is about 1e-3 (6e-4 on the degree-2 coefficient of ReLU).

    Args:
        function: Scalar function applied elementwise to a float64 tensor.
        degree: Hermite degree of the coefficient.
        num_points: Number of quadrature nodes.

    Returns:
        The coefficient as a Python float.
    """
    nodes, weights = hermite_e.hermegauss(num_points)
    weights = weights / math.sqrt(2.0 * math.pi)
    z = torch.from_numpy(nodes)
    values = function(z).double() * normalized_hermite(degree, z)
    return float(np.dot(weights, values.numpy()))
