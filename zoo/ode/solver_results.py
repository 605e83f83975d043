"""Result types and errors of :func:`zoo.ode.solver.solve_ivp`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


class ODESolverError(RuntimeError):
    """Base class of the errors raised when a solve cannot finish."""


class NonFiniteStateError(ODESolverError):
    """The state or the vector field became NaN or infinite."""


class StepSizeUnderflowError(ODESolverError):
    """The step size shrank to the rounding level of the time variable."""


class MaxStepsExceededError(ODESolverError):
    """The solve needed more steps than ``max_steps``."""


@dataclass
class SolverStats:
    """Statistics of one solve.

    The per-step tensors have one row per lock-step iteration in which at least one sample
    accepted its step. With a shared step size these rows are exactly the accepted steps.
    With per-sample steps, entries of samples that did not take the row's step (because they
    rejected it or had already finished) are zero and ``step_mask`` is false there.

    Attributes:
        nfe: Calls of the vector field, each on the whole batch, the initial-step
            selection included.
        n_accepted: Rows of the per-step tensors.
        n_rejected: Lock-step iterations in which at least one unfinished sample rejected
            its step.
        error_estimates: ``[n_accepted, batch]`` scaled error norm ``EEst`` of each step: the
            RMS over the non-batch dimensions of ``err / (atol + rtol * max(|y_j|, |y_j+1|))``,
            the quantity that the controller compares with 1. Differentiable.
        step_sizes: ``[n_accepted, batch]`` size ``dt`` of each step, detached.
        stiffness_estimates: ``[n_accepted, batch]`` estimate of the dominant eigenvalue
            magnitude of the Jacobian, ``||k7 - k6|| / ||g7 - g6||`` from the last two
            stages (both at the end of the step). Differentiable.
        step_mask: ``[n_accepted, batch]`` bool, true where the sample took the step.
        n_accepted_per_sample: ``[batch]`` accepted steps of each sample.
        n_rejected_per_sample: ``[batch]`` rejected steps of each sample.
    """

    nfe: int
    n_accepted: int
    n_rejected: int
    error_estimates: Tensor
    step_sizes: Tensor
    stiffness_estimates: Tensor
    step_mask: Tensor
    n_accepted_per_sample: Tensor
    n_rejected_per_sample: Tensor


@dataclass
class ODESolution:
    """Trajectory and statistics of one solve.

    Attributes:
        ts: Output times ``[T]``.
        ys: States at the output times, ``[T, *y0.shape]``.
        stats: Solver statistics.
    """

    ts: Tensor
    ys: Tensor
    stats: SolverStats
