"""An adaptive explicit Runge-Kutta solver that exposes its internal error and stiffness estimates.

:func:`solve_ivp` integrates ``dy/dt = func(t, y)`` with the Tsit5 or Dopri5 5(4) pair. It
returns the trajectory together with :class:`SolverStats`: the number of function evaluations,
the accepted and rejected steps, and for every accepted step the scaled local error estimate,
the step size and a stiffness estimate. The estimates keep their autograd graph, so a loss
built from them (ERNODE, SRNODE) is differentiated by backpropagation through the solver
(discretize-then-optimize).

With ``per_sample_steps=True`` dimension 0 of the state is a batch of independent problems.
Every sample then has its own time, step size and accept/reject decision. The samples advance
in lock-step through one batched call of ``func`` per stage. A sample that has reached the end
time or rejected its step keeps its state, so one hard sample does not force small steps on
the others. ``func`` receives ``t`` as a ``[batch]`` tensor in that mode and as a 0-d tensor
when the batch shares one step size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from zoo.ode.controller import PIController
from zoo.ode.runge_kutta import integrate_adaptive
from zoo.ode.solver_results import (
    MaxStepsExceededError,
    NonFiniteStateError,
    ODESolution,
    ODESolverError,
    SolverStats,
    StepSizeUnderflowError,
)
from zoo.ode.tableaus import get_tableau, stability_region_size, tableau_tensors

__all__ = [
    "MaxStepsExceededError",
    "NonFiniteStateError",
    "ODESolution",
    "ODESolverError",
    "SolverStats",
    "StepSizeUnderflowError",
    "solve_ivp",
    "stability_region_size",
]

logger = logging.getLogger(__name__)

VectorField = Callable[[Tensor, Tensor], Tensor]

_SUPPORTED_DTYPES = (torch.float16, torch.float32, torch.float64)


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid; use a finite number > 0.")
    return float(value)


def _check_inputs(
    func: object,
    y0: object,
    t: object,
    max_steps: object,
    per_sample_steps: object,
) -> tuple[Tensor, np.ndarray]:
    if not callable(func):
        raise TypeError(f"func must be callable as func(t, y), got {type(func).__name__}.")
    if not isinstance(y0, Tensor):
        raise TypeError(f"y0 must be a torch.Tensor, got {type(y0).__name__}.")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must have a real floating-point dtype, got {y0.dtype}.")
    if y0.dtype not in _SUPPORTED_DTYPES:
        # The solver's clock and error norms go through NumPy, which has no bfloat16 or float8.
        raise TypeError(
            f"y0 has dtype {y0.dtype}, which the solver does not support; convert it to "
            "torch.float16, torch.float32 or torch.float64."
        )
    if y0.numel() == 0:
        raise ValueError(f"y0 is empty (shape {tuple(y0.shape)}); pass at least one state.")
    if not isinstance(per_sample_steps, bool):
        raise TypeError(f"per_sample_steps must be a bool, got {per_sample_steps!r}.")
    if per_sample_steps and y0.dim() < 2:
        raise ValueError(
            f"per_sample_steps=True treats dimension 0 of y0 as the batch, so y0 needs at least "
            f"2 dimensions, got shape {tuple(y0.shape)}; add a state dimension with "
            "y0.unsqueeze(-1), or pass per_sample_steps=False."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps={max_steps!r} is invalid; use an integer >= 1.")
    if not bool(torch.isfinite(y0).all()):
        raise ValueError("y0 contains NaN or infinite values; pass a finite initial state.")

    if isinstance(t, Tensor):
        times = t.detach().to(dtype=y0.dtype, device=y0.device)
    elif isinstance(t, Sequence) and not isinstance(t, (str, bytes)):
        try:
            times = torch.tensor(t, dtype=y0.dtype, device=y0.device)
        except (TypeError, ValueError) as error:
            raise TypeError(f"t must be a 1-D sequence of numbers, got {t!r}: {error}") from error
    else:
        raise TypeError(f"t must be a 1-D tensor or sequence of times, got {type(t).__name__}.")
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(
            f"t must be 1-D with at least 2 times (start and end), got shape {tuple(times.shape)}."
        )
    # Validate in y0's dtype, where distinct times could have rounded to the same value.
    host_times = times.cpu().numpy().astype(np.float64)
    if not np.isfinite(host_times).all():
        raise ValueError(f"t contains NaN or infinite values: {host_times.tolist()}.")
    steps = np.diff(host_times)
    if not (steps > 0).all():
        position = int(np.nonzero(steps <= 0)[0][0])
        raise ValueError(
            f"t must be strictly increasing, but t[{position}]={host_times[position]} and "
            f"t[{position + 1}]={host_times[position + 1]} in {y0.dtype}; sort the output times "
            "and drop duplicates (to integrate backwards, solve in s = -t with "
            "dy/ds = -func(-s, y))."
        )
    return times, host_times


def solve_ivp(
    func: VectorField,
    y0: Tensor,
    t: Tensor | Sequence[float],
    *,
    method: str = "tsit5",
    rtol: float = 1e-3,
    atol: float = 1e-6,
    max_steps: int = 10_000,
    first_step: float | None = None,
    per_sample_steps: bool = True,
) -> ODESolution:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` with an adaptive 5(4) Runge-Kutta pair.

    An I controller chooses the step size from the scaled error norm
    ``RMS(err / (atol + rtol * max(|y_j|, |y_j+1|)))`` and accepts a step when that norm is at
    most 1. The first step comes from the algorithm of Hairer, Norsett and Wanner unless
    ``first_step`` is given. States at the output times ``t`` come from the method's 4th-order
    dense output, so output times do not shorten the steps. Gradients flow by backpropagation
    through every step to ``y0``, to the parameters of ``func`` and to the error and stiffness
    estimates in the statistics.

    Args:
        func: Vector field ``func(t, y) -> dy/dt`` with ``dy/dt`` of the shape of ``y``. With
            ``per_sample_steps=True``, ``t`` is a ``[batch]`` tensor of each sample's time;
            otherwise a 0-d tensor. Both have the dtype and device of ``y0``.
        y0: Initial state. With ``per_sample_steps=True`` dimension 0 is the batch of
            independent problems and at least one more dimension is required.
        t: Strictly increasing output times ``[T]``, ``T >= 2``; ``t[0]`` is the start time.
        method: ``"tsit5"`` (Tsitouras 2011) or ``"dopri5"`` (Dormand-Prince 1980).
        rtol: Relative tolerance, > 0.
        atol: Absolute tolerance, > 0.
        max_steps: Maximum number of attempted steps (lock-step iterations, rejected
            attempts included) before :class:`MaxStepsExceededError` is raised.
        first_step: Size of the first attempted step; ``None`` selects it automatically.
        per_sample_steps: Give every batch element its own time and step size. Correct only
            when the batch elements do not interact through ``func``.

    Returns:
        The states at ``t`` and the solver statistics.

    Raises:
        TypeError, ValueError: On invalid arguments; the message names the value.
        NonFiniteStateError: When ``func`` returns NaN or infinite values at every step size
            the controller tries.
        StepSizeUnderflowError: When the step size falls to the rounding level of ``t``.
        MaxStepsExceededError: When ``max_steps`` attempted steps do not reach ``t[-1]``.
    """
    times, host_times = _check_inputs(func, y0, t, max_steps, per_sample_steps)
    tableau = get_tableau(method)
    rtol = _check_positive("rtol", rtol)
    atol = _check_positive("atol", atol)
    if first_step is not None:
        first_step = _check_positive("first_step", first_step)
        first_step = min(first_step, float(host_times[-1] - host_times[0]))
    return integrate_adaptive(
        func,
        y0,
        times,
        host_times,
        tableau=tableau,
        coefficients=tableau_tensors(tableau.name, y0.dtype, y0.device),
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        first_step=first_step,
        per_sample_steps=per_sample_steps,
        controller=PIController(),
    )
