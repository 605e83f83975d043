"""L2-regularized multinomial logistic regression, solved by Newton's method.

The objective is ``mean_i CE(softmax(W [x_i; 1]), y_i) + ½ λ ||W||²`` over the weights
``W`` of shape ``(d + 1, K)`` (the last row is the intercept, also regularized so that the
problem is strongly convex). Its Hessian is formed in closed form, which is cheap when the
number of training examples is small, as in dataset distillation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_bias_column(features: torch.Tensor) -> torch.Tensor:
    """Append a column of ones for the intercept."""
    ones = torch.ones(features.shape[0], 1, dtype=features.dtype, device=features.device)
    return torch.cat([features, ones], dim=1)


def softmax_regression_objective(
    weights: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, l2_reg: float
) -> torch.Tensor:
    """Mean cross-entropy of ``add_bias_column(features) @ weights`` plus ``½ l2_reg ||W||²``."""
    logits = add_bias_column(features) @ weights
    return F.cross_entropy(logits, labels) + 0.5 * l2_reg * (weights * weights).sum()


def fit_softmax_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2_reg: float,
    init: torch.Tensor | None = None,
    maxiter: int = 30,
    tol: float = 1e-9,
) -> torch.Tensor:
    """Minimize :func:`softmax_regression_objective` by damped Newton steps; no graph is kept.

    Returns:
        Weights of shape ``(features.shape[1] + 1, num_classes)``.
    """
    if not l2_reg > 0:
        raise ValueError(f"l2_reg must be positive for a unique solution, got {l2_reg}.")
    features = features.detach()
    design = add_bias_column(features)
    count, width = design.shape
    targets = F.one_hot(labels, num_classes).to(design.dtype)
    if init is None:
        weights = torch.zeros(width, num_classes, dtype=design.dtype, device=design.device)
    else:
        weights = init.detach().clone()
    size = width * num_classes
    identity = torch.eye(size, dtype=design.dtype, device=design.device)
    value = softmax_regression_objective(weights, features, labels, l2_reg)
    for _ in range(maxiter):
        probabilities = torch.softmax(design @ weights, dim=1)
        gradient = design.T @ (probabilities - targets) / count + l2_reg * weights
        if gradient.abs().max() <= tol:
            break
        # Hessian of the mean cross-entropy: (1/N) sum_i x_i x_iᵀ ⊗ (diag(p_i) - p_i p_iᵀ).
        curvature = torch.diag_embed(probabilities) - probabilities.unsqueeze(2) * (
            probabilities.unsqueeze(1)
        )
        hessian = torch.einsum("ia,ib,ikl->akbl", design, design, curvature) / count
        hessian = hessian.reshape(size, size) + l2_reg * identity
        step = torch.linalg.solve(hessian, gradient.reshape(size)).reshape(width, num_classes)
        rate = 1.0
        while rate > 1e-8:
            candidate = weights - rate * step
            candidate_value = softmax_regression_objective(candidate, features, labels, l2_reg)
            if candidate_value <= value - 1e-4 * rate * (gradient * step).sum():
                break
            rate *= 0.5
        weights, value = candidate, candidate_value
    return weights
