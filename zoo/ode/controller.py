"""Step-size selection for the adaptive solver: the initial step and the step-size controller.

The controller's decisions (accept or reject, next step size) carry no gradient. The initial
step is computed under ``torch.no_grad``, and :class:`PIController` works on float64 NumPy arrays
on the host. Gradients flow through the states and error estimates that the solver computes with
these step sizes, not through the step sizes themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def initial_step_size(
    func: Callable[[Tensor, Tensor], Tensor],
    t0: float,
    y0: Tensor,
    f0: Tensor,
    rtol: float,
    atol: float,
    error_order: int,
    reduce: Callable[[np.ndarray], np.ndarray],
    to_tensor: Callable[[np.ndarray], Tensor],
) -> np.ndarray:
    """Pick the first step size by the algorithm of Hairer, Norsett and Wanner (1993), II.4.

    The step is sized so that an explicit Euler step changes the scaled state by about one
    percent, then corrected with a finite-difference estimate of the second derivative. One
    extra evaluation of ``func`` is made.

    Args:
        func: Vector field on flat states, called as ``func(t, y)`` with ``y`` ``[batch, n]``
            and ``t`` ``[m]``, where ``m`` is the batch size or 1 for a shared step.
        t0: Start time.
        y0: Initial states, ``[batch, n]``.
        f0: ``func(t0, y0)``.
        rtol: Relative tolerance.
        atol: Absolute tolerance.
        error_order: Order of the embedded error estimate (4 for the 5(4) pairs).
        reduce: Maps per-sample RMS norms ``[batch]`` to the controller's shape ``[m]``.
        to_tensor: Copies a float64 array to a tensor of the solve's dtype and device.

    Returns:
        Step sizes ``[m]``, float64.
    """
    inverse_sqrt_n = y0.shape[1] ** -0.5

    def rms(x: Tensor) -> np.ndarray:
        norms = torch.linalg.vector_norm(x, dim=1).cpu().numpy().astype(np.float64)
        return reduce(norms * inverse_sqrt_n)

    with torch.no_grad():
        scale = y0.abs().mul_(rtol).add_(atol)
        d0 = rms(y0 / scale)
        d1 = rms(f0 / scale)
        tiny = np.finfo(np.float64).tiny
        h0 = np.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / np.maximum(d1, tiny))
        y1 = torch.addcmul(y0, f0, to_tensor(h0).unsqueeze(1))
        f1 = func(to_tensor(t0 + h0), y1)
        d2 = rms((f1 - f0) / scale) / h0
    d_max = np.maximum(d1, d2)
    h1 = np.where(
        d_max <= 1e-15,
        np.maximum(h0 * 1e-3, 1e-6),
        (0.01 / np.maximum(d_max, tiny)) ** (1.0 / (error_order + 1)),
    )
    return np.minimum(100 * h0, h1)


@dataclass(frozen=True)
class PIController:
    """Proportional-integral step-size controller in the form of Hairer's DOPRI5 code.

    After an accepted step with scaled error ``err <= 1`` the next step is
    ``h * clamp(safety * err**-alpha * err_prev**beta, min_factor, max_factor)`` with
    ``alpha = 1/(q+1) - 0.75*beta`` for an embedded order ``q``. After a rejected step the
    step shrinks by ``max(min_factor, safety * err**(-alpha))``, and the next accepted step
    may not grow. A non-finite error counts as infinitely large, so the step shrinks by
    ``min_factor``.

    Attributes:
        safety: Safety factor on the optimal step.
        min_factor: Smallest ratio of new to old step.
        max_factor: Largest ratio of new to old step.
        beta: Weight of the previous accepted error. The default 0 is the I controller with
            ``alpha = 1/5`` for the 5(4) pairs, the rule of torchdiffeq's dopri5. Hairer's
            DOPRI5 uses 0.04, which took 20 to 30% more evaluations on the neural vector
            fields of ``benchmarks/ode_solver_vs_torchdiffeq.py``.
    """

    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    beta: float = 0.0

    def exponent(self, error_order: int) -> float:
        """Return ``alpha``, the exponent of the current error."""
        return 1.0 / (error_order + 1) - 0.75 * self.beta

    def propose_accepted(
        self, h: np.ndarray, error: np.ndarray, previous_error: np.ndarray, error_order: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Compute :meth:`propose` for the common case of no rejection in this or the last step."""
        growth = np.maximum(error, 1e-10) ** -self.exponent(error_order)
        factor = self.safety * growth * previous_error**self.beta
        factor = np.minimum(np.maximum(factor, self.min_factor), self.max_factor)
        return h * factor, np.maximum(error, 1e-4)

    def propose(
        self,
        h: np.ndarray,
        error: np.ndarray,
        previous_error: np.ndarray,
        accepted: np.ndarray,
        previous_rejected: np.ndarray,
        error_order: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Compute the next step sizes and the error memory for the next call.

        Args:
            h: Step sizes just attempted, ``[m]``.
            error: Scaled error norms of the attempt, ``[m]``; NaN is allowed.
            previous_error: Error of the last accepted step, ``[m]`` (initially ones).
            accepted: Whether each attempt was accepted, ``[m]`` bool.
            previous_rejected: Whether the attempt before this one was rejected, ``[m]`` bool.
            error_order: Order of the embedded error estimate.

        Returns:
            ``(next_h, next_previous_error)``, both ``[m]`` float64.
        """
        # NaN fails every comparison, so this maps NaN (and only NaN) to +inf.
        error = np.where(error <= np.inf, error, np.inf)
        scaled_growth = self.safety * np.maximum(error, 1e-10) ** -self.exponent(error_order)
        factor_accept = np.maximum(scaled_growth * previous_error**self.beta, self.min_factor)
        factor_accept = np.minimum(factor_accept, np.where(previous_rejected, 1.0, self.max_factor))
        factor_reject = np.minimum(np.maximum(scaled_growth, self.min_factor), 1.0)
        next_h = h * np.where(accepted, factor_accept, factor_reject)
        next_previous_error = np.where(accepted, np.maximum(error, 1e-4), previous_error)
        return next_h, next_previous_error
