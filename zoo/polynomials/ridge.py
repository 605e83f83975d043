"""Ridge regression from streamed sufficient statistics, with the penalty chosen by GCV.

The statistics are sums over samples, so batches, epochs and DDP ranks combine by
addition. The intercept is fitted but not penalised: the objective is

    (1 / n) * ||y - Z a - c||^2 + ridge * ||a||^2.

Generalised cross-validation (Golub, Heath and Wahba, 1979) picks the penalty from a
list without a held-out set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["RidgeSolution", "ridge_sums", "solve_ridge"]


def ridge_sums(features: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return the float64 sums that :func:`solve_ridge` needs, for one batch.

    Args:
        features: Design matrix Z, shape ``(n, m)``.
        targets: Targets y, shape ``(n,)``.

    Returns:
        ``gram`` (``[Z, 1]^T [Z, 1]``), ``moment`` (``[Z, 1]^T y``) and ``target_square_sum``.
    """
    ones = torch.ones(features.shape[0], 1, dtype=torch.float64, device=features.device)
    design = torch.cat([features.double(), ones], dim=1)
    targets = targets.double()
    return {
        "gram": design.T @ design,
        "moment": design.T @ targets,
        "target_square_sum": (targets * targets).sum(),
    }


@dataclass(frozen=True)
class RidgeSolution:
    """Fitted ridge weights and the penalty that GCV selected."""

    weight: torch.Tensor
    bias: torch.Tensor
    ridge: float
    gcv: float


def solve_ridge(sums: dict[str, torch.Tensor], ridges: Sequence[float]) -> RidgeSolution:
    """Solve the ridge problem for each penalty in ``ridges`` and keep the lowest GCV score.

    Args:
        sums: Summed outputs of :func:`ridge_sums`.
        ridges: Candidate penalties, each >= 0.

    Raises:
        ValueError: If ``ridges`` is empty or has a negative entry, or the sums hold fewer
            than two samples.
    """
    if len(ridges) == 0 or any(not 0 <= r < math.inf for r in ridges):
        raise ValueError(
            f"ridges must be a non-empty list of finite values >= 0, got {list(ridges)}."
        )
    gram, moment = sums["gram"], sums["moment"]
    count = float(gram[-1, -1])
    if count < 2:
        raise ValueError(f"Ridge regression needs at least 2 samples, got {count:.0f}.")
    feature_mean = gram[:-1, -1] / count
    target_mean = moment[-1] / count
    covariance = gram[:-1, :-1] / count - torch.outer(feature_mean, feature_mean)
    cross = moment[:-1] / count - feature_mean * target_mean
    target_variance = sums["target_square_sum"] / count - target_mean**2
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp_min(0.0)
    rotated = eigenvectors.T @ cross

    best: RidgeSolution | None = None
    for ridge in ridges:
        shrink = 1.0 / (eigenvalues + ridge)
        # Eigen-directions with zero variance and zero penalty carry no signal: skip them.
        shrink = torch.where(eigenvalues + ridge > 0, shrink, torch.zeros_like(shrink))
        residual = (
            target_variance
            - 2.0 * (rotated**2 * shrink).sum()
            + (eigenvalues * (rotated * shrink) ** 2).sum()
        )
        degrees_of_freedom = float((eigenvalues * shrink).sum()) + 1.0
        if degrees_of_freedom >= count:
            gcv = float("inf")
        else:
            gcv = float(residual.clamp_min(0.0)) / (1.0 - degrees_of_freedom / count) ** 2
        if best is None or gcv < best.gcv:
            weight = eigenvectors @ (rotated * shrink)
            bias = target_mean - feature_mean @ weight
            best = RidgeSolution(weight=weight, bias=bias, ridge=float(ridge), gcv=gcv)
    assert best is not None
    return best
