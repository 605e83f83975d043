"""Checks of the Butcher tableaus: consistency, convergence order, dense output, stability."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from zoo.ode.tableaus import TABLEAUS, ExplicitRKTableau, get_tableau, stability_region_size

NAMES = sorted(TABLEAUS)


def lower_triangular(tableau: ExplicitRKTableau) -> np.ndarray:
    s = tableau.n_stages
    matrix = np.zeros((s, s))
    for i, row in enumerate(tableau.a):
        matrix[i, : len(row)] = row
    return matrix


# Bernoulli equation y' = RATE * y + y**2, y(0) = 1, with a closed-form solution. One step
# from the exact state isolates the local error, which shrinks like h**(order + 1).
RATE = -1.3


def bernoulli_exact(t: float) -> float:
    return 1.0 / ((1.0 + 1.0 / RATE) * math.exp(-RATE * t) - 1.0 / RATE)


def one_step_stages(tableau: ExplicitRKTableau, h: float) -> list[float]:
    matrix = lower_triangular(tableau)
    stages: list[float] = []
    for i in range(tableau.n_stages):
        stage_y = 1.0 + h * sum(matrix[i, j] * stages[j] for j in range(i))
        stages.append(RATE * stage_y + stage_y**2)
    return stages


def local_order(error_at: Callable[[float], float]) -> float:
    """Return the observed exponent p of a local error that behaves like C * h**p."""
    return math.log2(error_at(0.1) / error_at(0.05))


@pytest.mark.parametrize("name", NAMES)
def test_rows_sum_to_stage_times(name: str) -> None:
    tableau = get_tableau(name)
    matrix = lower_triangular(tableau)

    np.testing.assert_allclose(matrix.sum(axis=1), tableau.c, atol=1e-14)
    assert math.isclose(sum(tableau.b), 1.0, abs_tol=1e-14)
    assert abs(sum(tableau.b_error)) < 1e-14
    # FSAL: the last stage is evaluated at the propagated solution.
    np.testing.assert_allclose(matrix[-1], tableau.b, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_propagated_and_embedded_orders(name: str) -> None:
    tableau = get_tableau(name)
    b = np.asarray(tableau.b)
    b_hat = b - np.asarray(tableau.b_error)

    for weights, order in ((b, tableau.order), (b_hat, tableau.error_order)):

        def error_at(h: float, weights: np.ndarray = weights) -> float:
            stepped = 1.0 + h * float(np.dot(weights, one_step_stages(tableau, h)))
            return abs(stepped - bernoulli_exact(h))

        observed = local_order(error_at)
        assert abs(observed - (order + 1)) < 0.5, f"local order {observed:.2f}, want {order + 1}"


@pytest.mark.parametrize("name", NAMES)
def test_dense_output_weights_are_consistent(name: str) -> None:
    tableau = get_tableau(name)
    polynomials = tableau.interpolation

    for theta in np.linspace(0.0, 1.0, 11):
        powers = theta ** np.arange(polynomials.shape[1])
        weights = polynomials @ powers
        assert math.isclose(weights.sum(), theta, abs_tol=1e-12)
    np.testing.assert_allclose(polynomials.sum(axis=1), tableau.b, atol=1e-12)
    np.testing.assert_allclose(polynomials[:, 0], 0.0, atol=0.0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("theta", [0.3, 0.5, 0.8])
def test_dense_output_is_fourth_order(name: str, theta: float) -> None:
    tableau = get_tableau(name)
    powers = theta ** np.arange(tableau.interpolation.shape[1])
    weights = tableau.interpolation @ powers

    def error_at(h: float) -> float:
        interpolated = 1.0 + h * float(np.dot(weights, one_step_stages(tableau, h)))
        return abs(interpolated - bernoulli_exact(theta * h))

    observed = local_order(error_at)
    assert 4.4 < observed < 5.6, f"local order {observed:.2f} at theta={theta}, want 5"


@pytest.mark.parametrize("name", NAMES)
def test_stability_region_size_matches_tableau(name: str) -> None:
    tableau = get_tableau(name)
    matrix = lower_triangular(tableau)
    b = np.asarray(tableau.b)
    identity = np.eye(tableau.n_stages)

    def amplification(z: float) -> float:
        return abs(1.0 + z * b @ np.linalg.solve(identity - z * matrix, np.ones(len(b))))

    # Bisect for the left end of the real stability interval, where |R(z)| crosses 1.
    low, high = 1.0, 6.0
    assert amplification(-low) <= 1.0 < amplification(-high)
    for _ in range(60):
        middle = 0.5 * (low + high)
        if amplification(-middle) <= 1.0:
            low = middle
        else:
            high = middle

    assert abs(stability_region_size(name) - low) < 2e-3
