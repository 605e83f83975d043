"""Hierarchical polynomial targets ``h(x) = g(p(x))`` on Gaussian inputs.

The hidden feature is a signed sum of products of k distinct orthonormal projections,

    p(x) = (1 / sqrt(r)) * sum_{i=0..r-1} s_i * prod_{j=0..k-1} <u_{(i + j) mod r}, x>,

over the r cyclic windows of k consecutive directions ``u_0 .. u_{r-1}`` (orthonormal),
with random signs ``s_i``. Each product is a distinct degree-k monomial in the
independent N(0, 1) projections, so the terms are orthonormal: ``E[p] = 0`` and
``E[p^2] = 1`` exactly. Each term depends on only k neighbouring projections, so p tends
to N(0, 1) in distribution as r grows (central limit theorem for k-dependent sums). This
is the class of normalised, nearly Gaussian features covered by Wang, Nichani and Lee,
"Learning Hierarchical Polynomials with Three-Layer Neural Networks" (ICLR 2024). For
k = 2 it is ``(x^T A x - tr A) / sqrt(2 ||A||_F^2)`` with a traceless A whose operator
norm is small against its Frobenius norm.

p is also harmonic (its Laplacian is zero). A feature such as ``sum_i He_k(<u_i, x>)``
is not: it has a component along ``|x|^2`` times a degree k - 2 polynomial, and for
Gaussian x the random-feature kernel of the first layer amplifies that component by a
factor of about d, so stage 1 learns a distorted p (measured at d = 16, k = 2 with the
identity link: correlation 0.75 with p at n1 = 8192 and 0.77 at n1 = 32768).

The link is ``g(z) = sum_j c_j He_j(z) / sqrt(j!)`` with the coefficients ``c_j`` given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from zoo.polynomials.hermite import normalized_hermite

logger = logging.getLogger(__name__)

__all__ = ["HierarchicalPolynomial", "validate_link_coefficients"]

# Below this many directions p is visibly non-Gaussian, and the degree-k part of g(p) is
# no longer close to E[g'(z)] * p.
MIN_GAUSSIAN_DIRECTIONS = 8


def validate_link_coefficients(
    link_coefficients: Sequence[float], require_linear_term: bool = True
) -> tuple[float, ...]:
    """Check the Hermite coefficients of the link g and return them as a tuple of floats.

    Args:
        link_coefficients: ``[c_0, c_1, ..., c_q]`` in the normalised Hermite basis.
        require_linear_term: Raise if ``c_1 = E[g'(z)]`` is zero. Pass False only to build
            a negative control on purpose.

    Raises:
        TypeError: If the coefficients are not a sequence of numbers.
        ValueError: If the link is constant or its last coefficient is zero, or if
            ``c_1`` is zero while ``require_linear_term`` is set.
    """
    if isinstance(link_coefficients, str | bytes) or not isinstance(link_coefficients, Sequence):
        raise TypeError(
            f"link_coefficients must be a list of numbers [c_0, ..., c_q], got "
            f"{link_coefficients!r}."
        )
    try:
        coefficients = tuple(float(c) for c in link_coefficients)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"link_coefficients must contain only numbers, got {list(link_coefficients)!r}."
        ) from error
    if not all(math.isfinite(c) for c in coefficients):
        raise ValueError(
            f"link_coefficients={list(coefficients)} contain NaN or infinite values, which "
            "would make every label NaN or infinite; give finite numbers."
        )
    if len(coefficients) < 2 or all(c == 0.0 for c in coefficients[1:]):
        raise ValueError(
            f"link_coefficients={list(coefficients)} describe a constant link g; give at "
            "least c_0 and a non-zero c_1, for example [0.0, 1.0, 0.0, 1.0]."
        )
    if coefficients[-1] == 0.0:
        raise ValueError(
            f"link_coefficients={list(coefficients)} end in a zero, so the degree q of g is "
            "ambiguous; drop the trailing zeros."
        )
    scale = math.sqrt(sum(c * c for c in coefficients[1:]))
    if require_linear_term and abs(coefficients[1]) < 1e-3 * scale:
        raise ValueError(
            f"link_coefficients={list(coefficients)} have first Hermite coefficient "
            f"c_1 = E[g'(z)] = {coefficients[1]}. The degree-k part of h = g(p) is then "
            "about c_1 * p = 0, so the one-step feature learning stage recovers nothing "
            "about p. Use a link with c_1 != 0, for example [0.0, 1.0, 0.0, 1.0]."
        )
    return coefficients


def _validate_sizes(input_dim: int, feature_degree: int, num_directions: int) -> None:
    if not isinstance(input_dim, int) or input_dim < 1:
        raise ValueError(f"input_dim must be a positive integer, got input_dim={input_dim!r}.")
    if not isinstance(feature_degree, int) or feature_degree < 1:
        raise ValueError(
            f"feature_degree must be an integer >= 1, got feature_degree={feature_degree!r}."
        )
    if not isinstance(num_directions, int) or not feature_degree <= num_directions <= input_dim:
        raise ValueError(
            f"num_directions must be an integer in [feature_degree={feature_degree}, "
            f"input_dim={input_dim}] because each term multiplies feature_degree distinct "
            f"orthonormal directions, got num_directions={num_directions!r}."
        )
    if feature_degree > 1 and num_directions < MIN_GAUSSIAN_DIRECTIONS:
        logger.warning(
            "num_directions=%d < %d: p is far from Gaussian, so the degree-%d part of "
            "g(p) is not close to E[g'(z)] * p and feature learning may miss p.",
            num_directions,
            MIN_GAUSSIAN_DIRECTIONS,
            feature_degree,
        )


class HierarchicalPolynomial(nn.Module):
    """A seeded target ``h = g(p(x))`` with a degree-k feature p and a degree-q link g.

    The directions and signs are buffers, so the target moves with ``.to(device)`` and is
    saved in a ``state_dict``.

    Args:
        input_dim: Dimension d of the Gaussian input x.
        feature_degree: Degree k of p (at least 1).
        link_coefficients: Hermite coefficients ``[c_0, ..., c_q]`` of g.
        num_directions: Number r of orthonormal directions in p, between k and d.
            Defaults to d.
        seed: Seed for the directions and signs.
        require_linear_term: See :func:`validate_link_coefficients`.

    Raises:
        ValueError: If a degree, dimension or direction count is out of range.
    """

    def __init__(
        self,
        input_dim: int,
        feature_degree: int,
        link_coefficients: Sequence[float] = (0.0, 1.0, 0.0, 1.0),
        num_directions: int | None = None,
        seed: int = 0,
        require_linear_term: bool = True,
    ) -> None:
        super().__init__()
        if num_directions is None:
            num_directions = input_dim
        _validate_sizes(input_dim, feature_degree, num_directions)
        self.input_dim = input_dim
        self.feature_degree = feature_degree
        self.num_directions = num_directions
        self.link_coefficients = validate_link_coefficients(
            link_coefficients, require_linear_term=require_linear_term
        )

        # With r == k every cyclic window is the same set, so p has a single term.
        num_terms = num_directions if num_directions > feature_degree else 1
        windows = [
            [(i + j) % num_directions for j in range(feature_degree)] for i in range(num_terms)
        ]
        generator = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(input_dim, input_dim, generator=generator, dtype=torch.float64)
        orthogonal, _ = torch.linalg.qr(gaussian)
        signs = torch.randint(0, 2, (num_terms,), generator=generator) * 2.0 - 1.0
        self.register_buffer("directions", orthogonal[:, :num_directions].float().contiguous())
        self.register_buffer("windows", torch.tensor(windows, dtype=torch.long))
        self.register_buffer("signs", signs.float())

    @property
    def link_degree(self) -> int:
        """Degree q of the link g."""
        return len(self.link_coefficients) - 1

    def feature(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate the hidden feature p on a batch ``x`` of shape ``(n, d)``; returns ``(n,)``."""
        projections = x @ self.directions
        terms = projections[:, self.windows].prod(dim=-1) * self.signs
        return terms.sum(dim=-1) / math.sqrt(self.windows.shape[0])

    def link(self, z: torch.Tensor) -> torch.Tensor:
        """Evaluate the link g elementwise."""
        return sum(c * normalized_hermite(j, z) for j, c in enumerate(self.link_coefficients))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate ``h(x) = g(p(x))`` on a batch of shape ``(n, d)``; returns ``(n,)``."""
        return self.link(self.feature(x))

    def sample(
        self, num_samples: int, generator: torch.Generator, noise_std: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``x ~ N(0, I_d)`` and return ``(x, y, p)``, where ``y = h(x) + noise``.

        Args:
            num_samples: Number of samples n.
            generator: Source of randomness, so that draws repeat.
            noise_std: Standard deviation of Gaussian label noise.
        """
        x = torch.randn(num_samples, self.input_dim, generator=generator)
        with torch.no_grad():
            p = self.feature(x)
            y = self.link(p)
        if noise_std > 0.0:
            y = y + noise_std * torch.randn(num_samples, generator=generator)
        return x, y, p
