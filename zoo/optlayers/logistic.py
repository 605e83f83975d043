"""L2-regularized logistic regression as an inner problem: objective, solvers, hypergradients.

The inner problem is ``min_w mean_i log(1 + exp(-s_i xᵢᵀw)) + ½ Σ_j exp(theta_j) w_j²`` with
labels ``s_i = ±1``, a per-feature log-regularization ``theta`` and an unregularized
intercept (a last column of ones in the design matrix). It is strongly convex in the
regularized coordinates, so the stationarity condition has a symmetric positive-definite
Jacobian (the Hessian) and the adjoint system is solved by CG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.optlayers.conditions import stationarity
from zoo.optlayers.implicit import implicit_root


def add_intercept(features: torch.Tensor) -> torch.Tensor:
    """Append a column of ones, the intercept's feature."""
    ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
    return torch.cat([features, ones], dim=1)


def penalty_weights(log_reg: torch.Tensor) -> torch.Tensor:
    """Return ``exp(log_reg)`` followed by 0 for the unregularized intercept."""
    zero = torch.zeros(1, dtype=log_reg.dtype, device=log_reg.device)
    return torch.cat([torch.exp(log_reg), zero])


def logistic_objective(
    weights: torch.Tensor, log_reg: torch.Tensor, design: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean logistic loss of 0/1 ``labels`` plus the per-feature L2 penalty."""
    loss = F.binary_cross_entropy_with_logits(design @ weights, labels)
    return loss + 0.5 * (penalty_weights(log_reg) * weights * weights).sum()


def _gradient_and_hessian(
    weights: torch.Tensor, log_reg: torch.Tensor, design: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    count = design.shape[0]
    probabilities = torch.sigmoid(design @ weights)
    penalty = penalty_weights(log_reg)
    gradient = design.T @ (probabilities - labels) / count + penalty * weights
    curvature = probabilities * (1 - probabilities) / count
    hessian = design.T @ (curvature.unsqueeze(1) * design) + torch.diag(penalty)
    return gradient, hessian


def fit_newton(
    log_reg: torch.Tensor,
    design: torch.Tensor,
    labels: torch.Tensor,
    init: torch.Tensor | None = None,
    maxiter: int = 50,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Minimize :func:`logistic_objective` by Newton's method with backtracking line search.

    Stops when the gradient's max-norm is below ``tol`` or after ``maxiter`` steps. The
    result carries no graph.
    """
    log_reg = log_reg.detach()
    if init is None:
        weights = torch.zeros(design.shape[1], dtype=design.dtype, device=design.device)
    else:
        weights = init.detach()
    value = logistic_objective(weights, log_reg, design, labels)
    for _ in range(maxiter):
        gradient, hessian = _gradient_and_hessian(weights, log_reg, design, labels)
        if gradient.abs().max() <= tol:
            break
        step = torch.linalg.solve(hessian, gradient)
        rate = 1.0
        # Armijo backtracking keeps the iteration monotone far from the minimum.
        while rate > 1e-8:
            candidate = weights - rate * step
            candidate_value = logistic_objective(candidate, log_reg, design, labels)
            if candidate_value <= value - 1e-4 * rate * (gradient @ step):
                break
            rate *= 0.5
        weights, value = candidate, candidate_value
    return weights


def gradient_descent_step_size(log_reg: torch.Tensor, design: torch.Tensor) -> float:
    """Return ``1 / L``, with ``L`` an upper bound of the objective's gradient Lipschitz constant."""
    smoothness = 0.25 * torch.linalg.matrix_norm(design, ord=2) ** 2 / design.shape[0]
    return float(1.0 / (smoothness + torch.exp(log_reg.detach()).max()))


def fit_gradient_descent(
    log_reg: torch.Tensor,
    design: torch.Tensor,
    labels: torch.Tensor,
    num_steps: int,
    step_size: float | None = None,
) -> torch.Tensor:
    """Run ``num_steps`` of gradient descent from zero; differentiable if ``log_reg`` is.

    With ``log_reg`` requiring grad, autograd records every step, which is unrolled
    differentiation: memory grows linearly with ``num_steps``.
    """
    rate = gradient_descent_step_size(log_reg, design) if step_size is None else step_size
    count = design.shape[0]
    penalty = penalty_weights(log_reg)
    weights = torch.zeros(design.shape[1], dtype=design.dtype, device=design.device)
    for _ in range(num_steps):
        probabilities = torch.sigmoid(design @ weights)
        gradient = design.T @ (probabilities - labels) / count + penalty * weights
        weights = weights - rate * gradient
    return weights


def solve_implicit(
    log_reg: torch.Tensor,
    design: torch.Tensor,
    labels: torch.Tensor,
    inner_solver: str = "newton",
    num_steps: int = 50,
    linear_solver: str = "cg",
    tol: float = 1e-10,
) -> torch.Tensor:
    """Fit the inner problem without a graph and differentiate the solution implicitly.

    Args:
        log_reg: Per-feature log-regularization, the differentiated hyperparameter.
        design: Inner features with the intercept column, see :func:`add_intercept`.
        labels: Inner 0/1 labels.
        inner_solver: ``"newton"`` (to ``tol``) or ``"gradient_descent"`` (``num_steps`` steps).
        num_steps: Iteration limit of the inner solver.
        linear_solver: Adjoint solver, see :mod:`zoo.optlayers.linear_solve`.
        tol: Inner stopping tolerance (Newton) and relative tolerance of the adjoint solve.
    """
    if inner_solver not in ("newton", "gradient_descent"):
        raise ValueError(
            f"inner_solver must be 'newton' or 'gradient_descent', got {inner_solver!r}."
        )

    def objective(weights: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return logistic_objective(weights, theta, design, labels)

    @implicit_root(stationarity(objective), solve=linear_solver, tol=tol)
    def solver(init: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if inner_solver == "newton":
            return fit_newton(theta, design, labels, init=init, maxiter=num_steps, tol=tol)
        return fit_gradient_descent(theta.detach(), design, labels, num_steps)

    init = torch.zeros(design.shape[1], dtype=design.dtype, device=design.device)
    return solver(init, log_reg)
