"""The stepping loop of the adaptive Runge-Kutta solver; call it through ``solve_ivp``.

The loop keeps every sample's state flat, ``[batch, n]``. Its clock (times, step sizes, accept
and reject decisions, output crossings) is a set of float64 NumPy arrays of length ``m`` on the
host: ``m`` is the batch size with per-sample steps and 1 with a shared step. Per-step overhead
is what limits speed on small problems, so the device work per stage is one stack, one matrix
product and one ``addcmul`` besides the vector-field call. The new state, the error estimate
and the stiffness estimate's denominator come out of one matrix product, and the only per-step
synchronization is the copy of the error norms to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
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

# A step below this many units of roundoff of the current time cannot advance the clock.
_UNDERFLOW_ULPS = 8.0

# Reductions of bool arrays, without the Python-level wrappers of ndarray.any and .all.
_any = np.logical_or.reduce
_all = np.logical_and.reduce


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
        if not self.per_sample and t.dim():
            t = t.reshape(())
        if self.reshape:
            return self.func(t, y.view(self.shape)).reshape(self.flat_shape)
        return self.func(t, y)

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
        if out.dtype != y.dtype or out.device != y.device:
            raise ValueError(
                f"func(t, y) returned {out.dtype} on {out.device} for a state of {y.dtype} on "
                f"{y.device}; return dy/dt with the dtype and device of y (for example by "
                "casting the vector field's parameters with .to(y0))."
            )
        return out.reshape(self.flat_shape)


def _combine(weights: Tensor, stages: list[Tensor]) -> Tensor:
    """Return ``weights @ stages`` for weights ``[r, i]``: ``[r, batch * n]``."""
    stacked = torch.stack(stages)
    return torch.mm(weights, stacked.view(len(stages), -1))


def _attempt_step(
    field: _FlatField,
    coefficients: TableauTensors,
    y: Tensor,
    abs_y: Tensor,
    k_first: Tensor,
    stage_times: tuple[Tensor, ...],
    h: Tensor,
    h_scaled: Tensor,
    rtol: float,
    atol: Tensor,
) -> tuple[Tensor, Tensor, list[Tensor], Tensor, Tensor]:
    """Take one Runge-Kutta step from ``y``.

    Args:
        stage_times: Time of each stage, each ``[m]`` (0-d for a shared step).
        h: Step sizes ``[m, 1]`` (0-d for a shared step).
        h_scaled: ``h / sqrt(n)``, ``[m]`` (0-d for a shared step), which turns the error
            norm into an RMS.

    Returns:
        ``(y_new, abs_y_new, stages, error_norm, gap_norms)``: the new state ``[batch, n]``
        and its absolute value, the stage derivatives (the FSAL stage last), the scaled error
        norm ``[batch]``, and ``[2, batch]`` norms for the stiffness estimate: of
        ``(g7 - g6) / h`` and of ``k7 - k6``, for the last two stage inputs ``g6, g7``.
    """
    stages = [k_first]
    y_stage = torch.addcmul(y, k_first, h, value=coefficients.a21)
    stages.append(field(stage_times[1], y_stage))
    for i in range(2, len(stage_times) - 1):
        combined = _combine(coefficients.a_rows[i], stages).view_as(y)
        y_stage = torch.addcmul(y, combined, h)
        stages.append(field(stage_times[i], y_stage))

    # One product gives the new state, the error estimate and the last stage-input gap.
    final = _combine(coefficients.final_weights, stages)
    y_new = torch.addcmul(y, final[0].view_as(y), h)
    k_last = field(stage_times[-1], y_new)
    stages.append(k_last)

    error = final[1].view_as(y).add(k_last, alpha=coefficients.b_error_last)
    abs_y_new = y_new.abs()
    scale = torch.add(atol, torch.maximum(abs_y, abs_y_new), alpha=rtol)
    error_norm = torch.linalg.vector_norm(error / scale, dim=1) * h_scaled

    # The stiffness estimate ||k7 - k6|| / ||g7 - g6|| is formed for all steps at once at the
    # end of the solve, from these two norms and the step sizes.
    gaps = torch.stack([final[2].view_as(y), k_last - stages[-2]])
    gap_norms = torch.linalg.vector_norm(gaps, dim=2)
    return y_new, abs_y_new, stages, error_norm, gap_norms


def _interpolate(
    y: Tensor,
    stages: list[Tensor],
    h: Tensor,
    theta: Tensor,
    interpolation_t: Tensor,
) -> Tensor:
    """Evaluate the dense output ``y + h * sum_i b_i(theta) k_i``.

    ``theta`` is ``[m]`` and ``h`` is ``[m, 1]``, or 0-d for a shared step.
    """
    degrees = torch.arange(interpolation_t.shape[0], device=theta.device, dtype=theta.dtype)
    weights = (theta.unsqueeze(1) ** degrees) @ interpolation_t  # [m, s]
    if weights.shape[0] == 1:
        combined = _combine(weights, stages).view_as(y)
    else:
        combined = torch.bmm(weights.unsqueeze(1), torch.stack(stages, dim=1)).squeeze(1)
    return torch.addcmul(y, combined, h)


class _HostToDevice:
    """Copy NumPy arrays to tensors of the solve's dtype and device, and error norms back."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        self.device = device
        self.on_cpu = device.type == "cpu"
        self.numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype

    def floats(self, values: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(values.astype(self.numpy_dtype))
        return tensor if self.on_cpu else tensor.to(self.device)

    def mask(self, values: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(np.array(values, dtype=bool))
        return tensor if self.on_cpu else tensor.to(self.device)

    def to_host(self, values: Tensor) -> np.ndarray:
        """Return a detached float64 copy of ``values`` on the host."""
        values = values.detach()
        if not self.on_cpu:
            values = values.cpu()
        return values.numpy().astype(np.float64)


def integrate_adaptive(
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    times: Tensor,
    output_times: np.ndarray,
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
    """Integrate with validated arguments; see :func:`zoo.ode.solver.solve_ivp`.

    ``output_times`` is ``times`` as a float64 NumPy array.
    """
    shape = y0.shape
    field = _FlatField(func, shape, per_sample_steps)
    to_device = _HostToDevice(y0.dtype, y0.device)
    y = y0.reshape(field.flat_shape)
    batch, n = y.shape
    m = batch if per_sample_steps else 1
    t_start, t_end = float(output_times[0]), float(output_times[-1])
    # Relative to each sample's current time, not to the span: near t = 0 a small step still
    # advances the clock, and a long span in float32 would otherwise reject the small first
    # step that a zero or tiny initial state gets.
    underflow_ulps = _UNDERFLOW_ULPS * torch.finfo(y.dtype).eps
    smallest_time = torch.finfo(y.dtype).tiny
    error_order = tableau.error_order
    n_stages = tableau.n_stages
    stage_fractions = np.asarray(tableau.c)[:, None]

    def reduce(norms: np.ndarray) -> np.ndarray:
        # A shared step is controlled by the RMS over the batch of the per-sample RMS norms.
        if per_sample_steps:
            return norms
        return np.sqrt(np.dot(norms, norms) / batch).reshape(1)

    def to_batch(values: np.ndarray) -> np.ndarray:
        return values if per_sample_steps else np.broadcast_to(values, (batch,))

    k_first = field.first_call(y.new_full((m,), t_start), y)
    if not bool(torch.isfinite(k_first).all()):
        raise NonFiniteStateError(
            f"func(t, y0) returned NaN or infinite values at t={t_start} (step 0); check the "
            "vector field and the initial state."
        )
    if first_step is None:
        h = initial_step_size(
            field,
            t_start,
            y.detach(),
            k_first.detach(),
            rtol,
            atol,
            error_order,
            reduce,
            to_device.floats,
        )
    else:
        h = np.full(m, first_step)
    h = np.minimum(h, t_end - t_start)

    # The clock stores each sample's remaining time t_end - t, so a step of exactly the
    # remaining time ends at 0 without rounding. A finished sample has h = inf.
    remaining = np.full(m, t_end - t_start)
    active = remaining > 0
    previous_rejected = np.zeros(m, dtype=bool)
    any_previous_rejected = False
    previous_error = np.ones(m)
    # Remaining time at each clock's next output time, -inf once all outputs are written.
    remaining_at_output = np.append(t_end - output_times, -np.inf)
    next_output = np.ones(m, dtype=np.int64)
    next_remaining = remaining_at_output[next_output]
    output_rows = [np.arange(batch)]
    output_values = [y]

    atol_tensor = y.new_tensor(atol)
    host_values = np.empty((n_stages + 2, m))
    abs_y = y.abs()
    inverse_sqrt_n = n**-0.5
    rows_error, rows_gap_norms, rows_h, rows_accepted, rows_rejected = [], [], [], [], []
    n_iterations = 0
    while True:
        if n_iterations >= max_steps:
            raise MaxStepsExceededError(
                f"max_steps={max_steps} attempted steps did not reach t={t_end}: the slowest "
                f"sample stopped at t={t_end - remaining.max():.6g} after {len(rows_error)} "
                f"accepted-step iterations. Raise max_steps, loosen rtol={rtol:g} / "
                f"atol={atol:g}, or check whether the dynamics are stiff (an explicit method "
                "needs many small steps there)."
            )
        n_iterations += 1

        # A finished sample has no time left, so its step is 0 and its state stays put.
        h_step = np.minimum(h, remaining)
        # Stage times, h and h / sqrt(n) go to the device in one transfer. A shared step
        # sends 0-d tensors, which broadcast against the batch.
        np.multiply(stage_fractions, h_step, out=host_values[:n_stages])
        host_values[:n_stages] += t_end - remaining
        host_values[n_stages] = h_step
        np.multiply(h_step, inverse_sqrt_n, out=host_values[n_stages + 1])
        device_values = to_device.floats(host_values)
        if per_sample_steps:
            device_values = device_values.unbind(0)
            h_tensor = device_values[n_stages].unsqueeze(1)
        else:
            device_values = device_values.view(-1).unbind(0)
            h_tensor = device_values[n_stages]
        y_new, abs_y_new, stages, error_norm, gap_norms = _attempt_step(
            field,
            coefficients,
            y,
            abs_y,
            k_first,
            device_values[:n_stages],
            h_tensor,
            device_values[n_stages + 1],
            rtol,
            atol_tensor,
        )

        error_host = reduce(to_device.to_host(error_norm))
        accepted = (error_host <= 1.0) & active
        rejected = active > accepted
        any_accepted = _any(accepted)
        any_rejected = _any(rejected)
        if any_rejected or any_previous_rejected:
            h_next, previous_error = controller.propose(
                h_step, error_host, previous_error, accepted, previous_rejected, error_order
            )
        else:
            h_next, previous_error = controller.propose_accepted(
                h_step, error_host, previous_error, error_order
            )

        rows_rejected.append(rejected)
        if any_accepted:
            rows_error.append(error_norm)
            rows_gap_norms.append(gap_norms)
            rows_h.append(h_step)
            rows_accepted.append(accepted)
        y_old = y
        if not any_rejected:
            # Finished samples took a step of size 0, so y_new equals y for them.
            y, abs_y, k_first = y_new, abs_y_new, stages[-1]
        elif any_accepted:
            mask = to_device.mask(to_batch(accepted)).unsqueeze(1)
            y = torch.where(mask, y_new, y)
            abs_y = torch.where(mask, abs_y_new, abs_y)
            k_first = torch.where(mask, stages[-1], k_first)
        # With no sample accepted, y and k_first keep their old graph, which drops the
        # attempt, so NaN or infinite stages of a rejected step cannot reach the gradients.

        remaining_old = remaining
        remaining = np.where(accepted, remaining - h_step, remaining)
        active = remaining > 0
        h = np.where(active, h_next, np.inf)
        previous_rejected = rejected
        any_previous_rejected = any_rejected

        crossing = accepted & (remaining <= next_remaining)
        while _any(crossing):
            if _all(next_remaining[crossing] == remaining[crossing]):
                # Every crossed output time is the end of the step (always true for t[-1]).
                values = y
            else:
                theta = np.divide(
                    remaining_old - next_remaining, h_step, out=np.zeros(m), where=crossing
                )
                values = _interpolate(
                    y_old,
                    stages,
                    h_tensor,
                    to_device.floats(np.clip(theta, 0.0, 1.0)),
                    coefficients.interpolation_t,
                )
            selected = np.nonzero(to_batch(crossing))[0]
            output_rows.append(to_batch(next_output)[selected] * batch + selected)
            output_values.append(values[torch.from_numpy(selected).to(y.device)])
            next_output = next_output + crossing
            next_remaining = remaining_at_output[next_output]
            crossing = accepted & (remaining <= next_remaining)

        t_now = t_end - remaining
        underflow_h = underflow_ulps * np.maximum(np.abs(t_now), smallest_time)
        if _any(h < underflow_h):
            underflow = h < underflow_h
            _raise_underflow(underflow, t_now, h, error_host, n_iterations, rtol, atol)
        if not _any(active):
            break

    ys = _assemble_outputs(output_rows, output_values, len(output_times), batch, n)
    stats = _collect_stats(
        rows_error, rows_gap_norms, rows_h, rows_accepted, rows_rejected, batch, field.calls
    )
    logger.debug(
        "Solved to t=%g: nfe=%d, accepted=%d, rejected=%d",
        t_end,
        stats.nfe,
        stats.n_accepted,
        stats.n_rejected,
    )
    return ODESolution(ts=times, ys=ys.view(len(output_times), *shape), stats=stats)


def _raise_underflow(
    underflow: np.ndarray,
    t_now: np.ndarray,
    h: np.ndarray,
    error: np.ndarray,
    step: int,
    rtol: float,
    atol: float,
) -> None:
    index = int(np.nonzero(underflow)[0][0])
    sample = f" (sample {index})" if underflow.size > 1 else ""
    if not np.isfinite(error[index]):
        raise NonFiniteStateError(
            f"Non-finite state at t={t_now[index]:.17g}, step {step}{sample}: the Runge-Kutta "
            f"stages stayed NaN or infinite for every step size down to h={h[index]:.3g}. The "
            "solution probably blows up here; check the dynamics, the initial state and the "
            "time span."
        )
    raise StepSizeUnderflowError(
        f"Step size underflow at t={t_now[index]:.17g}, step {step}{sample}: h={h[index]:.3g} "
        f"is at the rounding level of t with rtol={rtol:g}, atol={atol:g}. Loosen the "
        "tolerances, or check the dynamics for a singularity or finite-time blow-up near this t."
    )


def _assemble_outputs(
    rows: list[np.ndarray], values: list[Tensor], n_outputs: int, batch: int, n: int
) -> Tensor:
    index = np.concatenate(rows)
    if index.size != n_outputs * batch:
        raise RuntimeError(
            f"Internal solver error: {index.size} output states written, expected "
            f"{n_outputs * batch}; please report this with the problem that triggers it."
        )
    stacked = torch.cat(values)
    index_tensor = torch.from_numpy(index).to(stacked.device)
    return stacked.new_zeros(n_outputs * batch, n).index_copy(0, index_tensor, stacked)


def _collect_stats(
    rows_error: list[Tensor],
    rows_gap_norms: list[Tensor],
    rows_h: list[np.ndarray],
    rows_accepted: list[np.ndarray],
    rows_rejected: list[np.ndarray],
    batch: int,
    nfe: int,
) -> SolverStats:
    error = torch.stack(rows_error)
    device = error.device
    # Rows of a shared step have one column; broadcast them to the batch.
    accepted = np.broadcast_to(np.stack(rows_accepted), (len(rows_accepted), batch))
    rejected = np.broadcast_to(np.stack(rows_rejected), (len(rows_rejected), batch))
    h = np.broadcast_to(np.stack(rows_h), (len(rows_h), batch))
    mask = torch.from_numpy(np.array(accepted, dtype=bool)).to(device)
    zero = error.new_zeros(())
    step_sizes = np.where(accepted, h, 0.0)
    inverse_h = np.divide(1.0, step_sizes, out=np.zeros_like(step_sizes), where=accepted)

    # Stiffness ||k7 - k6|| / ||g7 - g6||, where g7 - g6 = h * (the first gap norm's vector).
    gap_norms = torch.stack(rows_gap_norms)
    tiny = torch.finfo(error.dtype).tiny
    stiffness = gap_norms[:, 1] / gap_norms[:, 0].clamp_min(tiny)
    stiffness = stiffness * torch.from_numpy(inverse_h).to(device=device, dtype=error.dtype)
    return SolverStats(
        nfe=nfe,
        n_accepted=len(rows_accepted),
        n_rejected=int(rejected.any(axis=1).sum()),
        error_estimates=torch.where(mask, error, zero),
        step_sizes=torch.from_numpy(step_sizes).to(device=device, dtype=error.dtype),
        stiffness_estimates=torch.where(mask, stiffness, zero),
        step_mask=mask,
        n_accepted_per_sample=mask.sum(dim=0),
        n_rejected_per_sample=torch.from_numpy(rejected.sum(axis=0)).to(device),
    )
