"""An ODE layer that solves with the instrumented solver and returns the regularization."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoo.ode.regularizers import ODERegularizer
from zoo.ode.solver import SolverStats, solve_ivp
from zoo.ode.tableaus import get_tableau


@dataclass
class ODEBlockOutput:
    """Result of one :class:`RegularizedODEBlock` solve.

    Attributes:
        ys: States at the output times, ``[T, batch, state_size]``.
        penalty: Scalar regularization ``"total"`` of the solve (zero for ``"none"``).
        terms: Named regularization terms, ``"total"`` included.
        stats: Solver statistics (NFE, accepted and rejected steps, per-step estimates).
    """

    ys: Tensor
    penalty: Tensor
    terms: dict[str, Tensor]
    stats: SolverStats


class RegularizedODEBlock(nn.Module):
    """Solve ``dy/dt = f(t, y)`` for a batch of flat states and regularize the solve.

    Gradients flow by backpropagation through every solver step (discretize-then-optimize),
    because the penalties of ERNODE and SRNODE depend on the solver's internal estimates,
    which an adjoint solve would not differentiate.

    Args:
        vector_field: Module called as ``vector_field(t, y)`` with ``y`` of shape
            ``[batch, state_size]``.
        regularizer: Penalty computed from each solve.
        method: Solver method name, for example ``"tsit5"`` or ``"dopri5"``.
        rtol: Relative tolerance of the step-size controller.
        atol: Absolute tolerance of the step-size controller.
        max_steps: Maximum number of solver steps before the solve raises.
        per_sample_steps: Give every batch element its own step size. Right when the
            elements are independent; then one hard sample does not set the NFE of all.
    """

    def __init__(
        self,
        vector_field: nn.Module,
        regularizer: ODERegularizer,
        method: str = "tsit5",
        rtol: float = 1e-3,
        atol: float = 1e-6,
        max_steps: int = 10_000,
        per_sample_steps: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("rtol", rtol), ("atol", atol)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid; use a finite number > 0.")
        # Look the method up now, so that a bad name fails before training starts.
        get_tableau(method)
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps={max_steps!r} is invalid; use an integer >= 1.")
        self.vector_field = vector_field
        self.regularizer = regularizer
        self.method = method
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.max_steps = max_steps
        self.per_sample_steps = per_sample_steps

    def forward(self, y0: Tensor, t: Tensor) -> ODEBlockOutput:
        """Solve from ``y0`` (``[batch, state_size]``) over the increasing times ``t`` (``[T]``).

        Extra state channels of the regularizer are integrated only in training mode,
        so evaluation measures the cost of the plain dynamics.
        """
        if y0.dim() != 2:
            raise ValueError(
                f"y0 must have shape [batch, state_size], got {tuple(y0.shape)}; flatten the "
                "state before the ODE block."
            )
        state_size = y0.shape[-1]
        channels = self.regularizer.augmented_channels
        augment = channels > 0 and self.training and torch.is_grad_enabled()
        func = self.vector_field
        start = y0
        if augment:
            func = self.regularizer.augment(self.vector_field, state_size)
            start = torch.cat([y0, y0.new_zeros(y0.shape[0], channels)], dim=-1)
        solution = solve_ivp(
            func,
            start,
            t,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            per_sample_steps=self.per_sample_steps,
        )
        ys = solution.ys
        augmented = None
        if augment:
            augmented = ys[-1, :, state_size:]
            ys = ys[..., :state_size]
        terms = self.regularizer(solution.stats, augmented)
        return ODEBlockOutput(ys=ys, penalty=terms["total"], terms=terms, stats=solution.stats)
