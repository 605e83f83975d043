"""Gradients through the solver (discretize-then-optimize) against finite differences."""

from __future__ import annotations

import pytest
import torch

from zoo.ode.runge_kutta import _attempt_step, _FlatField
from zoo.ode.solver import solve_ivp
from zoo.ode.tableaus import tableau_tensors


def make_field() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def central_difference(loss, tensor: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    gradient = torch.zeros_like(tensor)
    with torch.no_grad():
        flat = tensor.view(-1)
        for index in range(flat.numel()):
            original = flat[index].item()
            flat[index] = original + eps
            upper = loss().item()
            flat[index] = original - eps
            lower = loss().item()
            flat[index] = original
            gradient.view(-1)[index] = (upper - lower) / (2 * eps)
    return gradient


@pytest.mark.parametrize("per_sample_steps", [True, False])
def test_state_gradient_matches_finite_differences(per_sample_steps: bool) -> None:
    # At tight tolerances the step sizes' own dependence on y0 (which backpropagation through
    # the detached controller ignores) is far below the finite-difference error.
    field = make_field()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y0.requires_grad_(True)

    def loss() -> torch.Tensor:
        solution = solve_ivp(
            lambda t, y: field(y),
            y0,
            [0.0, 0.4, 1.0],
            rtol=1e-10,
            atol=1e-10,
            per_sample_steps=per_sample_steps,
        )
        return (solution.ys[1:] ** 2).sum()

    loss().backward()
    expected = central_difference(loss, y0)

    torch.testing.assert_close(y0.grad, expected, rtol=1e-6, atol=1e-7)


def test_parameter_gradient_matches_finite_differences() -> None:
    field = make_field()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weight = field[2].weight

    def loss() -> torch.Tensor:
        solution = solve_ivp(lambda t, y: field(y), y0, [0.0, 1.0], rtol=1e-10, atol=1e-10)
        return solution.ys[-1].sum()

    loss().backward()
    expected = central_difference(loss, weight)

    torch.testing.assert_close(weight.grad, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_step_estimates_gradient_matches_finite_differences(method: str) -> None:
    # The estimates are differentiated at the step size the controller chose, so the check
    # keeps the step size fixed and differentiates one step.
    field = make_field()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y0.requires_grad_(True)
    coefficients = tableau_tensors(method, torch.float64, torch.device("cpu"))
    flat_field = _FlatField(lambda t, y: field(y), y0.shape, per_sample=True)
    h = torch.tensor([0.3, 0.2, 0.5, 0.1], dtype=torch.float64)
    stage_times = tuple((coefficients.c[:, None] * h).unbind(0))

    def estimates() -> tuple[torch.Tensor, torch.Tensor]:
        _, _, _, error_norm, gap_norms = _attempt_step(
            flat_field,
            coefficients,
            y0,
            y0.abs(),
            flat_field(stage_times[0], y0),
            stage_times,
            h.unsqueeze(1),
            h / 3**0.5,
            1e-3,
            torch.tensor(1e-4, dtype=torch.float64),
        )
        # The stiffness estimate as the solver forms it from the two gap norms.
        stiffness = gap_norms[1] / (gap_norms[0] * h)
        return error_norm, stiffness

    for index in range(2):

        def loss(index: int = index) -> torch.Tensor:
            return estimates()[index].sum()

        y0.grad = None
        loss().backward()
        # A larger eps, because the stiffness ratio divides two small differences and the
        # roundoff of a smaller eps would dominate.
        expected = central_difference(loss, y0, eps=1e-4)
        scale = expected.abs().max().item()
        torch.testing.assert_close(y0.grad, expected, rtol=1e-5, atol=1e-5 * scale)


def test_estimates_carry_gradients_to_parameters() -> None:
    field = make_field()
    y0 = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    solution = solve_ivp(lambda t, y: field(y), y0, [0.0, 1.0], rtol=1e-4, atol=1e-6)
    penalty = solution.stats.error_estimates.sum() + solution.stats.stiffness_estimates.sum()
    penalty.backward()

    for name, parameter in field.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert not solution.stats.step_sizes.requires_grad
