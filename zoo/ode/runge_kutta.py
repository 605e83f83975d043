"""The stepping loop of the adaptive Runge-Kutta solver; call it through ``solve_ivp``.

The loop keeps every sample's state flat, ``[batch, n]``, and its clock in tensors of shape
``[m]``: ``m`` is the batch size with per-sample steps and 1 with a shared step. Besides the
vector-field calls, each step issues a fixed, small number of tensor operations: a stack, a
matrix-vector product and an ``addcmul`` per stage. It synchronizes with the device once per
step, to read four flags: any step accepted, any sample active, any output time crossed and
any step-size underflow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from zoo.ode.controller import PIController, initial_step_size
from zoo.ode.solver_results import (
    MaxStepsExceededError,
    NonFiniteStateError,
    ODESolution,
    SolverStats,
    StepSizeUnderflowError,
)
from zoo.ode.tableaus import ExplicitRKTableau, TableauTensors

logger = logging.getLogger(__name__)

# A step below this many units of roundoff of the largest time cannot advance the clock.
_UNDERFLOW_ULPS = 8.0


class _FlatField:
    """Call a user vector field on flat ``[batch, n]`` states and count the calls."""

    def __init__(
        self, func: Callable[[Tensor, Tensor], Tensor], shape: torch.Size, per_sample: bool
    ) -> None:
        self.func = func
        self.shape = shape
        self.per_sample = per_sample
        self.reshape = len(shape) != 2
        self.flat_shape = (shape[0] if len(shape) >= 2 else 1, -1)
        self.calls = 0

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        t_arg = t if self.per_sample else t.reshape(())
        if self.reshape:
            return self.func(t_arg, y.view(self.shape)).reshape(self.flat_shape)
        return self.func(t_arg, y)

    def first_call(self, t: Tensor, y: Tensor) -> Tensor:
        """Evaluate once and check the shape of the result."""
        self.calls += 1
        t_arg = t if self.per_sample else t.reshape(())
        out = self.func(t_arg, y.view(self.shape))
        if not isinstance(out, Tensor) or out.shape != self.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"func(t, y) returned {got} for a state of shape {tuple(self.shape)}; the vector "
                "field must return dy/dt with the shape of y."
            )
        return out.reshape(self.flat_shape)


def _combine(weights: Tensor, stages: list[Tensor]) -> Tensor:
    """Return ``sum_i weights[i] * stages[i]`` for shared weights ``[i]``."""
    stacked = torch.stack(stages)
    return (weights @ stacked.view(len(stages), -1)).view_as(stages[0])


def _interpolate(
    y: Tensor,
    stages: list[Tensor],
    h: Tensor,
    theta: Tensor,
    interpolation: Tensor,
) -> Tensor:
    """Evaluate the dense output ``y + h * sum_i b_i(theta) k_i`` for ``theta`` ``[m]``."""
    powers = theta.unsqueeze(1) ** torch.arange(
        interpolation.shape[1], device=theta.device, dtype=theta.dtype
    )
    weights = powers @ interpolation.T  # [m, s]
    if weights.shape[0] == 1:
        combined = _combine(weights[0], stages)
    else:
        combined = torch.bmm(weights.unsqueeze(1), torch.stack(stages, dim=1)).squeeze(1)
    return torch.addcmul(y, combined, h.unsqueeze(1))


def integrate_adaptive(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    times: Tensor,
    *,
    tableau: ExplicitRKTableau,
    coefficients: TableauTensors,
    rtol: float,
    atol: float,
    max_steps: int,
    first_step: float | None,
    per_sample_steps: bool,
    controller: PIController,
) -> ODESolution:
    """Integrate with validated arguments; see :func:`zoo.ode.solver.solve_ivp`."""
    shape = y0.shape
    field = _FlatField(func, shape, per_sample_steps)
    y = y0.reshape(field.flat_shape)
    batch, n = y.shape
    m = batch if per_sample_steps else 1
    n_outputs = times.shape[0]
    t_start = times[0].item()
    t_end = times[-1].item()
    underflow_h = _UNDERFLOW_ULPS * torch.finfo(y.dtype).eps * max(abs(t_start), abs(t_end))
    error_order = tableau.error_order
    n_stages = tableau.n_stages
    a_rows = coefficients.a_rows
    a21 = tableau.a[1][0]

    def to_batch(values: Tensor) -> Tensor:
        return values if per_sample_steps else values.expand(batch)

    def reduce(norms: Tensor) -> Tensor:
        if per_sample_steps:
            return norms
        return norms.square().mean().sqrt().unsqueeze(0)

    t_now = torch.full((m,), t_start, dtype=y.dtype, device=y.device)
    k_first = field.first_call(t_now, y)
    if not bool(torch.isfinite(k_first).all()):
        raise NonFiniteStateError(
            f"func(t, y0) returned NaN or infinite values at t={t_start} (step 0); check the "
            "vector field and the initial state."
        )
    if first_step is None:
        h = initial_step_size(
            field, t_now, y.detach(), k_first.detach(), rtol, atol, error_order, reduce
        )
    else:
        h = torch.full((m,), first_step, dtype=y.dtype, device=y.device)
    h = h.clamp(max=t_end - t_start)

    # Output times, padded with +inf so that a finished sample never crosses another one.
    padded_times = torch.cat([times, times.new_full((1,), torch.inf)])
    next_output = torch.ones(m, dtype=torch.long, device=y.device)
    next_time = padded_times[next_output]
    sample_index = torch.arange(batch, device=y.device)
    output_rows = [sample_index]
    output_values = [y]

    active = torch.ones(m, dtype=torch.bool, device=y.device)
    previous_rejected = torch.zeros(m, dtype=torch.bool, device=y.device)
    previous_error = torch.ones(m, dtype=y.dtype, device=y.device)
    t_end_tensor = torch.full((m,), t_end, dtype=y.dtype, device=y.device)
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    tiny = torch.finfo(y.dtype).tiny
    inv_sqrt_n = n**-0.5

    rows_error, rows_stiffness, rows_h, rows_accepted, rows_rejected = [], [], [], [], []
    n_iterations = 0
    while True:
        if n_iterations >= max_steps:
            t_min = t_now.min().item()
            raise MaxStepsExceededError(
                f"max_steps={max_steps} attempted steps did not reach t={t_end}: the slowest "
                f"sample stopped at t={t_min:.6g} after {len(rows_error)} accepted-step "
                f"iterations. Raise max_steps, loosen rtol={rtol:g} / atol={atol:g}, or check "
                "whether the dynamics are stiff (an explicit method needs many small steps there)."
            )
        n_iterations += 1

        remaining = t_end_tensor - t_now
        h_step = torch.where(active, torch.minimum(h, remaining), zero)
        h_column = h_step.unsqueeze(1)
        stage_times = torch.addcmul(t_now.unsqueeze(1), h_column, coefficients.c).unbind(1)

        stages = [k_first]
        y_stage = torch.addcmul(y, k_first, h_column, value=a21)
        for i in range(1, n_stages):
            if i > 1:
                y_stage = torch.addcmul(y, _combine(a_rows[i], stages), h_column)
            if i == n_stages - 2:
                y_before_last = y_stage
            stages.append(field(stage_times[i], y_stage))
        y_new = y_stage  # FSAL: the last stage is evaluated at the new state.
        k_last = stages[-1]

        error = _combine(coefficients.b_error_head, stages[:-1]).add(
            k_last, alpha=coefficients.b_error_last
        )
        scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
        error_norm = torch.linalg.vector_norm(error / scale, dim=1)
        error_norm = error_norm * to_batch(h_step * inv_sqrt_n)
        # Dominant-eigenvalue estimate ||f(g7) - f(g6)|| / ||g7 - g6|| from the last two stages.
        stage_gap = torch.linalg.vector_norm(y_new - y_before_last, dim=1)
        stiffness = torch.linalg.vector_norm(k_last - stages[-2], dim=1) / stage_gap.clamp_min(tiny)

        controller_error = reduce(error_norm.detach())
        accepted = (controller_error <= 1.0) & active
        h_next, previous_error = controller.propose(
            h_step, controller_error, previous_error, accepted, previous_rejected, error_order
        )
        rejected = active & ~accepted
        previous_rejected = rejected

        accepted_column = to_batch(accepted).unsqueeze(1)
        y_old = y
        k_first_old = k_first
        y = torch.where(accepted_column, y_new, y)
        k_first = torch.where(accepted_column, k_last, k_first)
        t_old = t_now
        t_candidate = t_now + h_step
        finishing = accepted & ((h >= remaining) | (t_candidate >= t_end_tensor))
        t_now = torch.where(accepted, t_candidate, t_now)
        t_now = torch.where(finishing, t_end_tensor, t_now)
        active = active & ~finishing
        h = h_next

        crossing = accepted & (next_time <= t_now)
        underflow = active & (h < underflow_h)
        any_accepted, any_active, any_crossing, any_underflow = torch.stack(
            [accepted.any(), active.any(), crossing.any(), underflow.any()]
        ).tolist()

        rows_rejected.append(rejected)
        if any_accepted:
            rows_error.append(error_norm)
            rows_stiffness.append(stiffness)
            rows_h.append(h_step)
            rows_accepted.append(accepted)
        else:
            # Drop the graph of an attempt that no sample accepted, so that NaN or infinite
            # stages of a rejected step cannot reach the gradients as 0 * NaN.
            y, k_first = y_old, k_first_old

        while any_crossing:
            theta = torch.where(crossing, (next_time - t_old) / h_step, zero).clamp(0.0, 1.0)
            values = _interpolate(y_old, stages, h_step, theta, coefficients.interpolation)
            selected = torch.nonzero(to_batch(crossing)).squeeze(1)
            output_rows.append(to_batch(next_output)[selected] * batch + selected)
            output_values.append(values[selected])
            next_output = next_output + crossing.long()
            next_time = padded_times[next_output]
            crossing = accepted & (next_time <= t_now)
            any_crossing = bool(crossing.any())

        if any_underflow:
            _raise_underflow(underflow, t_now, h, controller_error, n_iterations, rtol, atol)
        if not any_active:
            break

    ys = _assemble_outputs(output_rows, output_values, n_outputs, batch, n)
    stats = _collect_stats(
        rows_error, rows_stiffness, rows_h, rows_accepted, rows_rejected, to_batch, field.calls
    )
    logger.debug(
        "Solved to t=%g: nfe=%d, accepted=%d, rejected=%d",
        t_end,
        stats.nfe,
        stats.n_accepted,
        stats.n_rejected,
    )
    return ODESolution(ts=times, ys=ys.view(n_outputs, *shape), stats=stats)


def _raise_underflow(
    underflow: Tensor,
    t_now: Tensor,
    h: Tensor,
    controller_error: Tensor,
    step: int,
    rtol: float,
    atol: float,
) -> None:
    index = int(torch.nonzero(underflow)[0])
    t_value = t_now[index].item()
    h_value = h[index].item()
    sample = f" (sample {index})" if underflow.numel() > 1 else ""
    if not bool(torch.isfinite(controller_error[index])):
        raise NonFiniteStateError(
            f"Non-finite state at t={t_value:.17g}, step {step}{sample}: the Runge-Kutta stages "
            f"stayed NaN or infinite for every step size down to h={h_value:.3g}. The solution "
            "probably blows up here; check the dynamics, the initial state and the time span."
        )
    raise StepSizeUnderflowError(
        f"Step size underflow at t={t_value:.17g}, step {step}{sample}: h={h_value:.3g} is at "
        f"the rounding level of t with rtol={rtol:g}, atol={atol:g}. Loosen the tolerances, or "
        "check the dynamics for a singularity or finite-time blow-up near this t."
    )


def _assemble_outputs(
    rows: list[Tensor], values: list[Tensor], n_outputs: int, batch: int, n: int
) -> Tensor:
    index = torch.cat(rows)
    if index.numel() != n_outputs * batch:
        raise RuntimeError(
            f"Internal solver error: {index.numel()} output states written, expected "
            f"{n_outputs * batch}; please report this with the problem that triggers it."
        )
    stacked = torch.cat(values)
    return stacked.new_zeros(n_outputs * batch, n).index_copy(0, index, stacked)


def _collect_stats(
    rows_error: list[Tensor],
    rows_stiffness: list[Tensor],
    rows_h: list[Tensor],
    rows_accepted: list[Tensor],
    rows_rejected: list[Tensor],
    to_batch: Callable[[Tensor], Tensor],
    nfe: int,
) -> SolverStats:
    mask = torch.stack([to_batch(row) for row in rows_accepted])
    rejected = torch.stack([to_batch(row) for row in rows_rejected])
    error = torch.stack(rows_error)
    stiffness = torch.stack(rows_stiffness)
    h = torch.stack([to_batch(row) for row in rows_h])
    zero = error.new_zeros(())
    return SolverStats(
        nfe=nfe,
        n_accepted=len(rows_accepted),
        n_rejected=int(rejected.any(dim=1).sum()),
        error_estimates=torch.where(mask, error, zero),
        step_sizes=torch.where(mask, h, zero).detach(),
        stiffness_estimates=torch.where(mask, stiffness, zero),
        step_mask=mask,
        n_accepted_per_sample=mask.sum(dim=0),
        n_rejected_per_sample=rejected.sum(dim=0),
    )
