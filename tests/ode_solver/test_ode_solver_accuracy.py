"""Accuracy of solve_ivp against closed forms, SciPy's Radau and torchdiffeq's dopri5."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp as scipy_solve_ivp
from torchdiffeq import odeint

from zoo.ode.solver import solve_ivp

METHODS = ["tsit5", "dopri5"]
MODES = [True, False]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("per_sample_steps", MODES)
def test_exponential_decay_matches_closed_form(method: str, per_sample_steps: bool) -> None:
    rates = torch.tensor([[-0.5], [-1.0], [-3.0]], dtype=torch.float64)
    y0 = torch.tensor([[1.0], [2.0], [-0.5]], dtype=torch.float64)
    times = torch.linspace(0.0, 2.0, 9, dtype=torch.float64)

    solution = solve_ivp(
        lambda t, y: rates * y,
        y0,
        times,
        method=method,
        rtol=1e-8,
        atol=1e-10,
        per_sample_steps=per_sample_steps,
    )

    exact = y0 * torch.exp(rates * times[:, None, None])
    assert solution.ys.shape == (9, 3, 1)
    assert torch.equal(solution.ts, times)
    assert torch.equal(solution.ys[0], y0)
    assert (solution.ys - exact).abs().max().item() < 1e-7


@pytest.mark.parametrize("method", METHODS)
def test_linear_system_matches_matrix_exponential(method: str) -> None:
    # A damped rotation: eigenvalues -0.3 +- 2i, so the solution oscillates and decays.
    matrix = torch.tensor([[-0.3, 2.0], [-2.0, -0.3]], dtype=torch.float64)
    y0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, -2.0], [3.0, 1.0]], dtype=torch.float64)
    times = torch.tensor([0.0, 0.3, 1.1, 2.5, 4.0], dtype=torch.float64)

    solution = solve_ivp(lambda t, y: y @ matrix.T, y0, times, method=method, rtol=1e-7, atol=1e-9)

    for index, time in enumerate(times):
        exact = y0 @ torch.linalg.matrix_exp(matrix * time).T
        error = (solution.ys[index] - exact).abs().max().item()
        assert error < 1e-6, f"error {error:.2e} at t={time.item()}"


def van_der_pol(mu: float):
    def torch_field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        position, velocity = y[..., 0], y[..., 1]
        acceleration = mu * (1 - position**2) * velocity - position
        return torch.stack([velocity, acceleration], dim=-1)

    def numpy_field(t: float, y: np.ndarray) -> np.ndarray:
        return np.array([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    return torch_field, numpy_field


VDP_STARTS = ((2.0, 0.0), (0.5, 1.0))
VDP_TIMES = tuple(np.linspace(0.0, 6.0, 7))


@cache
def van_der_pol_reference(start: tuple[float, float]) -> np.ndarray:
    """Van der Pol (mu=5) states at VDP_TIMES from SciPy's implicit Radau at tight tolerances."""
    _, numpy_field = van_der_pol(mu=5.0)
    reference = scipy_solve_ivp(
        numpy_field, (0.0, 6.0), start, method="Radau", t_eval=VDP_TIMES, rtol=1e-10, atol=1e-12
    )
    assert reference.success, reference.message
    return reference.y.T


@pytest.mark.parametrize("method", METHODS)
def test_van_der_pol_matches_scipy_radau(method: str) -> None:
    torch_field, _ = van_der_pol(mu=5.0)
    starts = [list(start) for start in VDP_STARTS]
    times = np.asarray(VDP_TIMES)

    solution = solve_ivp(
        torch_field,
        torch.tensor(starts, dtype=torch.float64),
        torch.tensor(times),
        method=method,
        rtol=1e-8,
        atol=1e-10,
    )

    for sample, start in enumerate(VDP_STARTS):
        ours = solution.ys[:, sample].numpy()
        error = np.abs(ours - van_der_pol_reference(start)).max()
        assert error < 1e-5, f"sample {sample}: max error {error:.2e} against Radau"


def test_van_der_pol_shows_rejected_steps() -> None:
    # At mu=5 the relaxation phases force the controller to shrink the step after a rejection.
    torch_field, _ = van_der_pol(mu=5.0)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)

    solution = solve_ivp(torch_field, y0, [0.0, 10.0], rtol=1e-6, atol=1e-8)

    assert solution.stats.n_rejected > 0
    assert solution.stats.n_accepted > 20


class CountingField(torch.nn.Module):
    """A fixed random tanh MLP vector field that counts its calls."""

    def __init__(self, dim: int = 4, hidden: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(hidden, dim, generator=generator, dtype=torch.float64)
        self.w2 = torch.randn(dim, hidden, generator=generator, dtype=torch.float64) / 2
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(y @ self.w1.T) @ self.w2.T - 0.1 * y


@pytest.mark.parametrize("method", METHODS)
def test_accuracy_and_nfe_like_torchdiffeq(method: str) -> None:
    field = CountingField()
    y0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    times = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    reference = odeint(field, y0, times, rtol=1e-12, atol=1e-12, method="dopri5")

    field.calls = 0
    theirs = odeint(field, y0, times, rtol=1e-6, atol=1e-8, method="dopri5")
    their_nfe = field.calls
    field.calls = 0
    ours = solve_ivp(field, y0, times, method=method, rtol=1e-6, atol=1e-8, per_sample_steps=False)

    their_error = (theirs - reference).abs().max().item()
    our_error = (ours.ys - reference).abs().max().item()
    assert our_error < 3 * their_error + 1e-9, f"ours {our_error:.2e} vs {their_error:.2e}"
    assert ours.stats.nfe == field.calls
    assert 0.5 * their_nfe <= ours.stats.nfe <= 2.0 * their_nfe, (ours.stats.nfe, their_nfe)


def test_float32_state_is_supported() -> None:
    y0 = torch.tensor([[1.0], [2.0]], dtype=torch.float32)

    solution = solve_ivp(lambda t, y: -y, y0, [0.0, 1.0], rtol=1e-5, atol=1e-7)

    assert solution.ys.dtype == torch.float32
    exact = y0 * torch.exp(torch.tensor(-1.0))
    assert (solution.ys[-1] - exact).abs().max().item() < 1e-5
