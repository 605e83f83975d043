"""Euclidean projections onto convex sets and proximal operators, batched over leading dims.

All functions act on the last dimension and are differentiable almost everywhere, so they
can appear inside the fixed-point maps of :mod:`zoo.optlayers.conditions`.
"""

from __future__ import annotations

import torch


def projection_non_negative(y: torch.Tensor) -> torch.Tensor:
    """Project onto the non-negative orthant ``{x : x >= 0}``."""
    return torch.clamp(y, min=0.0)


def projection_box(
    y: torch.Tensor, lower: torch.Tensor | float, upper: torch.Tensor | float
) -> torch.Tensor:
    """Project onto the box ``{x : lower <= x <= upper}`` (bounds broadcast against ``y``)."""
    lower_t = torch.as_tensor(lower, dtype=y.dtype, device=y.device)
    upper_t = torch.as_tensor(upper, dtype=y.dtype, device=y.device)
    if bool((lower_t > upper_t).any()):
        raise ValueError("projection_box needs lower <= upper elementwise; some lower > upper.")
    return torch.minimum(torch.maximum(y, lower_t), upper_t)


def projection_l2_ball(y: torch.Tensor, radius: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Project onto the Euclidean ball ``{x : ||x||_2 <= radius}``."""
    radius_t = torch.as_tensor(radius, dtype=y.dtype, device=y.device)
    if bool((radius_t <= 0).any()):
        raise ValueError(f"radius must be positive, got {radius}.")
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    scale = torch.where(norm > radius_t, radius_t / norm.clamp_min(1e-30), torch.ones_like(norm))
    return y * scale


def projection_simplex(y: torch.Tensor, radius: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Project onto the scaled simplex ``{x : x >= 0, sum(x) = radius}``.

    Uses the sort-based algorithm of Held, Wolfe and Crowder (1974), as popularized by
    Duchi et al. (2008): find the threshold ``tau`` with ``sum(max(y - tau, 0)) = radius``.
    With ``radius=1`` this is sparsemax (Martins and Astudillo, 2016).
    """
    radius_t = torch.as_tensor(radius, dtype=y.dtype, device=y.device)
    if bool((radius_t <= 0).any()):
        raise ValueError(f"radius must be positive, got {radius}.")
    # A radius per problem has the batch shape of y; give it a trailing axis to broadcast.
    radius_t = radius_t.unsqueeze(-1) if radius_t.dim() else radius_t
    sorted_y, _ = torch.sort(y, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_y, dim=-1) - radius_t
    ranks = torch.arange(1, y.shape[-1] + 1, dtype=y.dtype, device=y.device)
    support = sorted_y - cumulative / ranks > 0
    # The support is a prefix of the sorted entries; its length selects tau.
    support_size = support.sum(dim=-1, keepdim=True)
    tau = torch.gather(cumulative, -1, support_size - 1) / support_size.to(y.dtype)
    return torch.clamp(y - tau, min=0.0)


def sparsemax(logits: torch.Tensor) -> torch.Tensor:
    """Return sparsemax probabilities: the projection of ``logits`` onto the unit simplex."""
    return projection_simplex(logits, 1.0)


def prox_l1(y: torch.Tensor, strength: torch.Tensor | float) -> torch.Tensor:
    """Soft thresholding, the proximal operator of ``strength * ||x||_1``."""
    strength_t = torch.as_tensor(strength, dtype=y.dtype, device=y.device)
    return torch.sign(y) * torch.clamp(y.abs() - strength_t, min=0.0)
