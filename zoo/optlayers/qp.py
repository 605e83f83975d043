"""A batched dense quadratic-program solver in PyTorch, differentiable through its KKT system.

The problem, for each batch element, is ``min ½xᵀQx + qᵀx  s.t.  Gx <= h, Ax = b`` with a
symmetric positive-definite ``Q`` (semidefinite works when the problem is bounded). The
forward pass runs Mehrotra's predictor-corrector primal-dual interior-point method on the
whole batch at once, in float64. The backward pass differentiates the KKT conditions at the
solution as in OptNet (Amos and Kolter, "OptNet: Differentiable Optimization as a Layer in
Neural Networks", ICML 2017): one batched solve of the transposed KKT system per backward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class QPSolution:
    """Solution of a batch of QPs and per-element solver diagnostics (all float64)."""

    x: torch.Tensor
    """Primal solutions, shape ``(batch, n)``."""
    eq_dual: torch.Tensor
    """Equality multipliers ``nu``, shape ``(batch, p)``."""
    ineq_dual: torch.Tensor
    """Inequality multipliers ``lam >= 0``, shape ``(batch, m)``."""
    slack: torch.Tensor
    """Slacks ``s = h - Gx >= 0``, shape ``(batch, m)``."""
    converged: torch.Tensor
    """Boolean per element: residuals and duality gap below tolerance."""
    residual: torch.Tensor
    """Largest scaled KKT residual or gap per element."""
    iterations: int
    """Interior-point iterations run for the batch."""


def _bmv(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _bmtv(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return (matrix.transpose(-1, -2) @ vector.unsqueeze(-1)).squeeze(-1)


def _max_step(value: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Return the largest ``alpha`` in [0, 1] with ``value + alpha * step >= 0``, per batch element."""
    ratios = torch.where(step < 0, -value / step.where(step < 0, -1.0), torch.inf)
    return ratios.amin(dim=-1).clamp(max=1.0)


def _kkt_residuals(Q, q, G, h, A, b, x, y, z, s):
    dual = _bmv(Q, x) + q + _bmtv(G, z) + _bmtv(A, y)
    primal_ineq = _bmv(G, x) + s - h
    primal_eq = _bmv(A, x) - b
    return dual, primal_ineq, primal_eq


def _newton_direction(lu, pivots, G, s, z, residuals, target):
    """Solve the Newton system with ``s * dz + z * ds = target``, eliminating ``ds`` and ``dz``.

    ``lu, pivots`` factor ``[[Q + Gᵀ diag(z/s) G, Aᵀ], [A, 0]]``.
    """
    r_dual, r_ineq, r_eq = residuals
    n = G.shape[-1]
    rhs_x = -r_dual - _bmtv(G, (target + z * r_ineq) / s)
    rhs = torch.cat([rhs_x, -r_eq], -1).unsqueeze(-1)
    step = torch.linalg.lu_solve(lu, pivots, rhs).squeeze(-1)
    dx, dy = step[:, :n], step[:, n:]
    ds = -r_ineq - _bmv(G, dx)
    dz = (target - z * ds) / s
    return dx, dy, ds, dz


def solve_qp_batch(
    Q: torch.Tensor,
    q: torch.Tensor,
    G: torch.Tensor,
    h: torch.Tensor,
    A: torch.Tensor,
    b: torch.Tensor,
    tol: float = 1e-9,
    maxiter: int = 50,
) -> QPSolution:
    """Solve a batch of QPs by a primal-dual interior-point method.

    All inputs are float64 and carry the batch dimension: ``Q (B, n, n)``, ``q (B, n)``,
    ``G (B, m, n)``, ``h (B, m)``, ``A (B, p, n)``, ``b (B, p)`` with ``m >= 1`` (``p`` may
    be 0). Use :class:`QPLayer` for validation, broadcasting and gradients.

    Returns:
        The solution; elements that did not reach ``tol`` within ``maxiter`` iterations, or
        whose Newton system became singular (an infeasible or unbounded problem, a singular
        ``Q``, linearly dependent rows of ``A``), have ``converged == False``.
    """
    batch, n = q.shape
    m = h.shape[-1]
    p = b.shape[-1]
    zeros_pp = torch.zeros(batch, p, p, dtype=q.dtype, device=q.device)

    def factor(weights: torch.Tensor):
        hessian = Q + G.transpose(-1, -2) @ (weights.unsqueeze(-1) * G)
        top = torch.cat([hessian, A.transpose(-1, -2)], dim=-1)
        bottom = torch.cat([A, zeros_pp], dim=-1)
        # lu_factor_ex reports a singular matrix per element (info > 0) instead of raising for
        # the whole batch. That element's solves then turn non-finite and it ends unconverged.
        lu, pivots, info = torch.linalg.lu_factor_ex(torch.cat([top, bottom], dim=-2))
        return lu, pivots, info != 0

    # Start from the minimizer of the objective plus ½||Gx - h||², then shift the slacks
    # into the interior.
    lu, pivots, singular = factor(torch.ones(batch, m, dtype=q.dtype, device=q.device))
    start = torch.linalg.lu_solve(lu, pivots, torch.cat([-q + _bmtv(G, h), b], -1).unsqueeze(-1))
    x = start[:, :n, 0]
    y = torch.zeros(batch, p, dtype=q.dtype, device=q.device)
    s = h - _bmv(G, x)
    s = s + torch.clamp(1.0 - s.amin(dim=-1, keepdim=True), min=0.0)
    z = torch.ones(batch, m, dtype=q.dtype, device=q.device)

    scale_dual = 1.0 + q.abs().amax(dim=-1)
    scale_primal = 1.0 + torch.cat([h, b], -1).abs().amax(dim=-1)
    converged = torch.zeros(batch, dtype=torch.bool, device=q.device)
    residual = torch.full((batch,), torch.inf, dtype=q.dtype, device=q.device)
    iteration = 0
    for iteration in range(1, maxiter + 1):  # noqa: B007 (the count is reported)
        r_dual, r_ineq, r_eq = _kkt_residuals(Q, q, G, h, A, b, x, y, z, s)
        mu = (s * z).sum(-1) / m
        residual = torch.stack(
            [
                r_dual.abs().amax(-1) / scale_dual,
                torch.cat([r_ineq, r_eq], -1).abs().amax(-1) / scale_primal,
                mu,
            ]
        ).amax(0)
        converged = (residual <= tol) & ~singular
        if bool((converged | singular).all()):
            break
        lu, pivots, singular_now = factor(z / s)
        singular = singular | singular_now

        residuals = (r_dual, r_ineq, r_eq)
        _, _, ds_aff, dz_aff = _newton_direction(lu, pivots, G, s, z, residuals, -s * z)
        alpha_aff = torch.minimum(_max_step(s, ds_aff), _max_step(z, dz_aff)).unsqueeze(-1)
        mu_aff = ((s + alpha_aff * ds_aff) * (z + alpha_aff * dz_aff)).sum(-1) / m
        sigma = (mu_aff / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        target = -s * z + (sigma * mu).unsqueeze(-1) - ds_aff * dz_aff
        dx, dy, ds, dz = _newton_direction(lu, pivots, G, s, z, residuals, target)
        alpha = 0.99 * torch.minimum(_max_step(s, ds), _max_step(z, dz))
        # Converged elements stay where they are while the rest of the batch iterates.
        alpha = torch.where(converged, 0.0, alpha.clamp(max=1.0)).unsqueeze(-1)
        x = x + alpha * dx
        y = y + alpha * dy
        s = s + alpha * ds
        z = z + alpha * dz
    converged = converged & ~singular & torch.isfinite(x).all(-1)
    return QPSolution(x, y, z, s, converged, residual, iteration)


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, Q, q, G, h, A, b, tol: float, maxiter: int, info: dict):
        solution = solve_qp_batch(Q, q, G, h, A, b, tol=tol, maxiter=maxiter)
        info["solution"] = solution
        ctx.save_for_backward(
            Q,
            G,
            A,
            solution.x,
            solution.eq_dual,
            solution.ineq_dual,
            solution.slack,
            solution.converged,
        )
        # Failed elements return zeros, because their last iterate may be huge or NaN.
        return torch.where(solution.converged.unsqueeze(-1), solution.x, 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_x: torch.Tensor):
        Q, G, A, x, y, z, s, converged = ctx.saved_tensors
        batch, n = x.shape
        m, p = z.shape[-1], y.shape[-1]
        dtype, device = x.dtype, x.device
        # Transposed KKT Jacobian of (Qx + q + Gᵀz + Aᵀy, z ∘ (Gx - h), Ax - b) in (x, z, y),
        # using Gx - h = -s at the solution.
        kkt_t = torch.zeros(batch, n + m + p, n + m + p, dtype=dtype, device=device)
        kkt_t[:, :n, :n] = Q.transpose(-1, -2)
        kkt_t[:, :n, n : n + m] = G.transpose(-1, -2) * z.unsqueeze(-2)
        kkt_t[:, :n, n + m :] = A.transpose(-1, -2)
        kkt_t[:, n : n + m, :n] = G
        kkt_t[:, n : n + m, n : n + m] = torch.diag_embed(-s)
        kkt_t[:, n + m :, :n] = A

        rhs = torch.zeros(batch, n + m + p, dtype=dtype, device=device)
        rhs[:, :n] = -grad_x
        # Failed elements get the identity system with a zero right-hand side, so their
        # gradient is zero instead of the solve failing on a singular or non-finite matrix.
        failed = ~converged
        if bool(failed.any()):
            identity = torch.eye(n + m + p, dtype=dtype, device=device)
            kkt_t = torch.where(failed.view(-1, 1, 1), identity, kkt_t)
            rhs = torch.where(failed.view(-1, 1), 0.0, rhs)
            x, y, z = (torch.where(failed.view(-1, 1), 0.0, value) for value in (x, y, z))
        adjoint = torch.linalg.solve(kkt_t, rhs)

        u_x, u_z, u_y = adjoint[:, :n], adjoint[:, n : n + m], adjoint[:, n + m :]
        scaled_u_z = z * u_z
        grad_Q = 0.5 * (u_x.unsqueeze(-1) * x.unsqueeze(-2) + x.unsqueeze(-1) * u_x.unsqueeze(-2))
        grad_q = u_x
        grad_G = z.unsqueeze(-1) * u_x.unsqueeze(-2) + scaled_u_z.unsqueeze(-1) * x.unsqueeze(-2)
        grad_h = -scaled_u_z
        grad_A = y.unsqueeze(-1) * u_x.unsqueeze(-2) + u_y.unsqueeze(-1) * x.unsqueeze(-2)
        grad_b = -u_y
        return grad_Q, grad_q, grad_G, grad_h, grad_A, grad_b, None, None, None


_EXPECTED_RANK = {"Q": 2, "q": 1, "G": 2, "h": 1, "A": 2, "b": 1}


def _validate_and_batch(
    tensors: dict[str, torch.Tensor | None],
) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Check types and shapes, naming the argument, and expand every input to the batch."""
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"QP argument {name} must be a torch.Tensor, got {type(value).__name__}."
            )
        if value is not None and not value.is_floating_point():
            raise TypeError(f"QP argument {name} must be floating point, got dtype {value.dtype}.")

    if (tensors["A"] is None) != (tensors["b"] is None):
        raise ValueError("Pass A and b together (equality constraints Ax = b), or neither.")

    batch_sizes = set()
    for name, value in tensors.items():
        if value is None:
            continue
        rank = _EXPECTED_RANK[name]
        if value.dim() not in (rank, rank + 1):
            raise ValueError(
                f"QP argument {name} must have {rank} dimensions, or {rank + 1} with a leading "
                f"batch dimension; received shape {tuple(value.shape)}."
            )
        if value.dim() == rank + 1:
            batch_sizes.add(value.shape[0])
    if len(batch_sizes) > 1:
        raise ValueError(f"QP arguments have different batch sizes {sorted(batch_sizes)}.")
    batched = bool(batch_sizes)
    batch = batch_sizes.pop() if batched else 1

    n = tensors["q"].shape[-1]
    m = tensors["h"].shape[-1]
    if m < 1:
        raise ValueError("The QP layer needs at least one inequality row in G and h.")
    p = 0 if tensors["b"] is None else tensors["b"].shape[-1]
    expected = {"Q": (n, n), "q": (n,), "G": (m, n), "h": (m,), "A": (p, n), "b": (p,)}

    out: dict[str, torch.Tensor] = {}
    reference = tensors["q"]
    for name, value in tensors.items():
        if value is None:
            value = torch.zeros(expected[name], dtype=reference.dtype, device=reference.device)
        if tuple(value.shape[-len(expected[name]) :]) != expected[name]:
            raise ValueError(
                f"QP argument {name} must have shape {expected[name]} (optionally with a batch "
                f"dimension first); received {tuple(value.shape)}."
            )
        if value.dim() == len(expected[name]):
            value = value.unsqueeze(0).expand((batch, *expected[name]))
        out[name] = value.to(torch.float64)
    return out, batch, batched


class QPLayer(torch.nn.Module):
    """Differentiable layer returning the solution of ``min ½xᵀQx + qᵀx s.t. Gx <= h, Ax = b``.

    Each argument may carry a leading batch dimension or none (then it is shared by the
    batch). Solving and differentiating run in float64; the output has the dtype of ``q``.
    After each call, :attr:`last_solution` contains the per-element diagnostics. Elements that
    did not converge (an infeasible problem, for example) are reported by index. With
    ``on_failure="warn"`` a warning is logged and they are returned as zeros with zero
    gradient, so the caller can mask them. With ``on_failure="raise"`` a ``RuntimeError``
    is raised.

    NOTE: each call runs about ten small batched factorizations and solves. On a CPU that
    other processes keep busy, PyTorch's intra-op threads made the layer 14 times slower
    (2 threads against 1 on 2 cores), so set ``torch.set_num_threads(1)`` there.

    Args:
        tol: Tolerance on the scaled KKT residuals and the duality gap.
        maxiter: Maximum number of interior-point iterations.
        on_failure: ``"warn"`` or ``"raise"``.
    """

    def __init__(self, tol: float = 1e-9, maxiter: int = 50, on_failure: str = "warn") -> None:
        super().__init__()
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"tol must be a number, got {tol!r}.")
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}.")
        if isinstance(maxiter, bool) or not isinstance(maxiter, int):
            raise TypeError(f"maxiter must be an int, got {maxiter!r}.")
        if maxiter < 1:
            raise ValueError(f"maxiter must be at least 1, got {maxiter}.")
        if on_failure not in ("warn", "raise"):
            raise ValueError(f"on_failure must be 'warn' or 'raise', got {on_failure!r}.")
        self.tol = tol
        self.maxiter = maxiter
        self.on_failure = on_failure
        self.last_solution: QPSolution | None = None

    def forward(
        self,
        Q: torch.Tensor,
        q: torch.Tensor,
        G: torch.Tensor,
        h: torch.Tensor,
        A: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Solve the batch and return ``x`` with shape ``(batch, n)``, or ``(n,)`` if unbatched."""
        inputs, _, batched = _validate_and_batch({"Q": Q, "q": q, "G": G, "h": h, "A": A, "b": b})
        info: dict[str, QPSolution] = {}
        x = _QPFunction.apply(
            inputs["Q"],
            inputs["q"],
            inputs["G"],
            inputs["h"],
            inputs["A"],
            inputs["b"],
            self.tol,
            self.maxiter,
            info,
        )
        solution = info["solution"]
        self.last_solution = solution
        failed = torch.nonzero(~solution.converged).flatten().tolist()
        if failed:
            message = (
                f"QP solve did not converge for batch indices {failed} within {self.maxiter} "
                f"iterations (residuals {solution.residual[failed].tolist()}); the problems "
                "may be infeasible or unbounded."
            )
            if self.on_failure == "raise":
                raise RuntimeError(message)
            logger.warning(message)
        x = x.to(q.dtype)
        return x if batched else x.squeeze(0)
