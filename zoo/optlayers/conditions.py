"""Optimality conditions to pair with :func:`~zoo.optlayers.implicit.implicit_root`.

Each builder returns a function of ``(x, *theta)``. Root conditions (``F = 0`` at the
solution) go to ``implicit_root``; fixed-point maps (``x = T(x)`` at the solution) go to
``implicit_fixed_point``. Pair a solver with the fixed-point map of the same algorithm it
runs: the map only has to be differentiable almost everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Objective = Callable[..., torch.Tensor]


def _gradient(objective: Objective, x: torch.Tensor, theta: tuple[Any, ...]) -> torch.Tensor:
    """``∇ₓ objective(x, *theta)`` with a graph, so it can be differentiated again."""
    with torch.enable_grad():
        x_graph = x if x.requires_grad else x.detach().requires_grad_(True)
        value = objective(x_graph, *theta)
        if value.dim() != 0:
            raise ValueError(
                f"The objective must return a scalar (sum over a batch of independent problems), "
                f"got shape {tuple(value.shape)}."
            )
        (gradient,) = torch.autograd.grad(value, x_graph, create_graph=True)
    return gradient


def _check_step_size(step_size: float) -> None:
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}.")


def stationarity(objective: Objective) -> Callable[..., torch.Tensor]:
    """Return ``F(x, *theta) = ∇ₓ objective(x, *theta)``, zero at an unconstrained minimum.

    ``∂F/∂x`` is the Hessian, symmetric and positive definite for a strongly convex
    objective, so pair it with ``solve="cg"``. For a batch of independent problems let the
    objective return the sum of their values.
    """

    def optimality(x: torch.Tensor, *theta: Any) -> torch.Tensor:
        return _gradient(objective, x, theta)

    return optimality


def projected_gradient_fixed_point(
    objective: Objective, projection: Callable[..., torch.Tensor], step_size: float = 1.0
) -> Callable[..., torch.Tensor]:
    """Return ``T(x, *theta) = projection(x - step_size * ∇ₓ objective(x, *theta), *theta)``.

    ``projection(y, *theta)`` receives every parameter and uses those it needs, for example
    ``lambda y, *theta: projection_box(y, theta[1], theta[2])``.
    """
    _check_step_size(step_size)

    def fixed_point_map(x: torch.Tensor, *theta: Any) -> torch.Tensor:
        return projection(x - step_size * _gradient(objective, x, theta), *theta)

    return fixed_point_map


def proximal_gradient_fixed_point(
    objective: Objective, prox: Callable[..., torch.Tensor], step_size: float = 1.0
) -> Callable[..., torch.Tensor]:
    """Return ``T(x, *theta) = prox(x - step_size * ∇ₓ objective(x, *theta), step_size, *theta)``.

    ``prox(y, step_size, *theta)`` is the proximal operator of ``step_size * g`` for the
    non-smooth term ``g``; for an L1 penalty with weight ``theta[k]`` use
    ``lambda y, eta, *theta: prox_l1(y, eta * theta[k])``.
    """
    _check_step_size(step_size)

    def fixed_point_map(x: torch.Tensor, *theta: Any) -> torch.Tensor:
        return prox(x - step_size * _gradient(objective, x, theta), step_size, *theta)

    return fixed_point_map


def mirror_descent_simplex_fixed_point(
    objective: Objective, step_size: float = 1.0
) -> Callable[..., torch.Tensor]:
    """Return the entropic mirror-descent map on the simplex (last dimension).

    ``T(p) = softmax(log p - step_size * ∇ₚ objective(p, *theta))``; it needs ``p > 0``.
    """
    _check_step_size(step_size)

    def fixed_point_map(p: torch.Tensor, *theta: Any) -> torch.Tensor:
        gradient = _gradient(objective, p, theta)
        return torch.softmax(torch.log(p) - step_size * gradient, dim=-1)

    return fixed_point_map


def kkt_conditions(
    objective: Objective,
    num_primal: int,
    equality: Callable[..., torch.Tensor] | None = None,
    inequality: Callable[..., torch.Tensor] | None = None,
    num_equality: int = 0,
) -> Callable[..., torch.Tensor]:
    """Return the KKT map of ``min f(x) s.t. equality(x) = 0, inequality(x) <= 0``.

    The variable is ``z = cat(x, nu, lam)`` along the last dimension, with ``num_primal``
    primal entries, ``num_equality`` equality multipliers ``nu`` and the rest inequality
    multipliers ``lam``. The map is
    ``(∇f + J_eqᵀ nu + J_ineqᵀ lam, equality(x), lam * inequality(x))``. Primal and dual
    feasibility are left out because they hold on a neighborhood of a strictly
    complementary solution. ``∂F/∂z`` is not symmetric: use normal CG, GMRES or dense.
    """
    if num_primal < 1:
        raise ValueError(f"num_primal must be at least 1, got {num_primal}.")
    if num_equality < 0:
        raise ValueError(f"num_equality must be non-negative, got {num_equality}.")
    if (equality is None) != (num_equality == 0):
        raise ValueError(
            f"Pass equality together with num_equality > 0 (got equality={equality!r}, "
            f"num_equality={num_equality})."
        )

    def optimality(z: torch.Tensor, *theta: Any) -> torch.Tensor:
        x = z[..., :num_primal]
        nu = z[..., num_primal : num_primal + num_equality]
        lam = z[..., num_primal + num_equality :]
        if inequality is None and lam.shape[-1] != 0:
            raise ValueError(
                f"z has {lam.shape[-1]} trailing entries but no inequality constraints."
            )

        def lagrangian(x_var: torch.Tensor, *params: Any) -> torch.Tensor:
            value = objective(x_var, *params)
            if equality is not None:
                value = value + (nu * equality(x_var, *params)).sum()
            if inequality is not None:
                value = value + (lam * inequality(x_var, *params)).sum()
            return value

        parts = [_gradient(lagrangian, x, theta)]
        if equality is not None:
            parts.append(equality(x, *theta))
        if inequality is not None:
            parts.append(lam * inequality(x, *theta))
        return torch.cat(parts, dim=-1)

    return optimality


def qp_kkt_conditions(
    z: torch.Tensor,
    Q: torch.Tensor,
    q: torch.Tensor,
    G: torch.Tensor,
    h: torch.Tensor,
    A: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> torch.Tensor:
    """KKT map of ``min ½xᵀQx + qᵀx s.t. Gx <= h, Ax = b`` in closed form, batched.

    ``z = cat(x, nu, lam)`` along the last dimension; ``Q`` is symmetric. Matrices carry the
    batch dimensions of ``z`` or none.
    """
    n = q.shape[-1]
    p = 0 if A is None else A.shape[-2]
    x = z[..., :n]
    nu = z[..., n : n + p]
    lam = z[..., n + p :]

    def matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return (matrix @ vector.unsqueeze(-1)).squeeze(-1)

    def rmatvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return (matrix.transpose(-1, -2) @ vector.unsqueeze(-1)).squeeze(-1)

    stationary = matvec(Q, x) + q + rmatvec(G, lam)
    parts = []
    if A is not None:
        if b is None:
            raise ValueError("qp_kkt_conditions needs b together with A.")
        stationary = stationary + rmatvec(A, nu)
        parts.append(matvec(A, x) - b)
    parts.append(lam * (matvec(G, x) - h))
    return torch.cat([stationary, *parts], dim=-1)
