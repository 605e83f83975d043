"""Failure modes of solve_ivp: solver errors and input validation."""

from __future__ import annotations

import re
import time

import pytest
import torch

from zoo.ode.solver import (
    MaxStepsExceededError,
    NonFiniteStateError,
    ODESolverError,
    StepSizeUnderflowError,
    solve_ivp,
)
from zoo.ode.tableaus import get_tableau, stability_region_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blow_up_raises_instead_of_hanging(dtype: torch.dtype) -> None:
    # y' = y**2, y(0) = 1 has the solution 1 / (1 - t), which blows up at t = 1.
    start = time.perf_counter()
    with pytest.raises(ODESolverError) as raised:
        solve_ivp(lambda t, y: y**2, torch.ones(1, 1, dtype=dtype), [0.0, 2.0])
    elapsed = time.perf_counter() - start

    assert isinstance(raised.value, (StepSizeUnderflowError, NonFiniteStateError))
    message = str(raised.value)
    match = re.search(r"at t=([0-9.e+-]+), step (\d+)", message)
    assert match, message
    assert 0.99 < float(match.group(1)) < 1.0
    assert "rtol" in message or "NaN" in message
    assert elapsed < 60


def test_underflow_names_step_size_and_tolerances() -> None:
    with pytest.raises(StepSizeUnderflowError) as raised:
        solve_ivp(lambda t, y: y**2, torch.ones(2, 1, dtype=torch.float64), [0.0, 2.0], rtol=1e-4)

    message = str(raised.value)
    assert "h=" in message
    assert "rtol=0.0001" in message
    assert "atol=1e-06" in message
    assert "Loosen the tolerances" in message


def test_non_finite_derivative_names_time_and_step() -> None:
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Returns NaN for any state evaluated at t > 0.5, a blow-up the solver cannot step past.
        return torch.where(t.unsqueeze(1) > 0.5, y * float("nan"), -y)

    with pytest.raises(NonFiniteStateError) as raised:
        solve_ivp(field, torch.ones(2, 1, dtype=torch.float64), [0.0, 1.0])

    message = str(raised.value)
    match = re.search(r"t=([0-9.e+-]+), step (\d+)", message)
    assert match, message
    assert abs(float(match.group(1)) - 0.5) < 1e-6
    assert int(match.group(2)) > 1


def test_non_finite_initial_derivative_is_step_zero() -> None:
    with pytest.raises(NonFiniteStateError, match=r"t=0\.0 \(step 0\)"):
        solve_ivp(lambda t, y: y / 0.0, torch.ones(2, 1), [0.0, 1.0])


def test_max_steps_is_enforced_and_reported() -> None:
    calls = 0

    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.cos(20 * t).unsqueeze(1) * y

    with pytest.raises(MaxStepsExceededError, match="max_steps=5 ") as raised:
        solve_ivp(field, torch.ones(3, 1), [0.0, 10.0], max_steps=5)

    assert "Raise max_steps" in str(raised.value)
    assert calls == 2 + 6 * 5


def test_recovers_after_rejected_non_finite_step() -> None:
    # The vector field is NaN below y = -0.5, far from the solution exp(-20 t), but the stages
    # of a first step of size 1 overshoot there. The solver must reject that attempt, shrink
    # the step and still reach t = 1.
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y < -0.5, torch.full_like(y, float("nan")), -20.0 * y)

    solution = solve_ivp(field, torch.ones(1, 1, dtype=torch.float64), [0.0, 1.0], first_step=1.0)

    assert solution.stats.n_rejected >= 1
    assert torch.isfinite(solution.ys).all()
    assert abs(solution.ys[-1].item() - torch.exp(torch.tensor(-20.0)).item()) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"t": [0.0, 1.0, 1.0]}, ValueError, r"strictly increasing, but t\[1\]=1.0"),
        ({"t": [1.0, 0.0]}, ValueError, "strictly increasing"),
        ({"t": [0.0]}, ValueError, "at least 2 times"),
        ({"t": torch.zeros(2, 2)}, ValueError, "1-D"),
        ({"t": [0.0, float("nan")]}, ValueError, "NaN or infinite"),
        ({"t": "0 1"}, TypeError, "1-D tensor or sequence"),
        ({"t": [0.0, "1"]}, TypeError, "1-D sequence of numbers"),
        ({"rtol": 0.0}, ValueError, "rtol=0.0 is invalid"),
        ({"rtol": -1e-3}, ValueError, "rtol=-0.001 is invalid"),
        ({"atol": float("nan")}, ValueError, "atol=nan is invalid"),
        ({"atol": "small"}, TypeError, "atol must be a number"),
        ({"max_steps": 0}, ValueError, "max_steps=0 is invalid"),
        ({"max_steps": 2.5}, ValueError, "max_steps=2.5 is invalid"),
        ({"first_step": -0.1}, ValueError, "first_step=-0.1 is invalid"),
        ({"method": "tsit"}, ValueError, "Did you mean 'tsit5'"),
        ({"method": "dopri"}, ValueError, "Did you mean 'dopri5'"),
        ({"method": "euler"}, ValueError, r"use one of \['dopri5', 'tsit5'\]"),
        ({"method": 5}, TypeError, "method must be a string"),
        ({"per_sample_steps": 1}, TypeError, "per_sample_steps must be a bool"),
        ({"y0": torch.ones(3)}, ValueError, "y0.unsqueeze"),
        ({"y0": torch.ones(2, 1, dtype=torch.long)}, TypeError, "floating-point"),
        ({"y0": torch.ones(2, 1, dtype=torch.bfloat16)}, TypeError, "torch.bfloat16, which"),
        ({"y0": torch.tensor([[float("inf")]])}, ValueError, "y0 contains NaN"),
        ({"y0": torch.ones(0, 2)}, ValueError, "y0 is empty"),
        ({"y0": [[1.0]]}, TypeError, "y0 must be a torch.Tensor"),
        ({"func": "not callable"}, TypeError, "func must be callable"),
        ({"func": lambda t, y: y[:, :1]}, ValueError, r"returned \(2, 1\) for a state of"),
        ({"func": lambda t, y: y.double()}, ValueError, "returned torch.float64 on cpu"),
    ],
)
def test_invalid_arguments_are_rejected(kwargs: dict, error: type, pattern: str) -> None:
    arguments = {"func": lambda t, y: -y, "y0": torch.ones(2, 3), "t": [0.0, 1.0]}
    arguments.update(kwargs)
    func = arguments.pop("func")
    y0 = arguments.pop("y0")
    t = arguments.pop("t")

    with pytest.raises(error, match=pattern):
        solve_ivp(func, y0, t, **arguments)


def test_unbatched_state_needs_shared_steps() -> None:
    solution = solve_ivp(lambda t, y: -y, torch.ones(3), [0.0, 1.0], per_sample_steps=False)

    assert solution.ys.shape == (2, 3)
    assert solution.stats.error_estimates.shape[1] == 1


def test_method_lookup_is_case_insensitive() -> None:
    assert get_tableau("Tsit5").name == "tsit5"
    assert stability_region_size("DOPRI5") == get_tableau("dopri5").stability_region_size


@pytest.mark.parametrize("t_end", [100.0, 1e4])
def test_long_float32_span_has_no_false_underflow(t_end: float) -> None:
    # A zero derivative or a zero initial state gets a 1e-6 first step, which is far above the
    # rounding level of t = 0 even though the span ends at a large time.
    constant = solve_ivp(lambda t, y: torch.zeros_like(y), torch.ones(2, 1), [0.0, t_end])
    assert torch.equal(constant.ys[-1], torch.ones(2, 1))
    relaxing = solve_ivp(lambda t, y: 1.0 - y, torch.zeros(2, 1), [0.0, t_end])
    torch.testing.assert_close(relaxing.ys[-1], torch.ones(2, 1), rtol=0, atol=1e-3)
