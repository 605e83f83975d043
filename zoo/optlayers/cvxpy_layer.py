"""A cvxpylayers layer for any DPP-compliant CVXPY problem, with validation and per-sample status.

``cvxpylayers.torch.CvxpyLayer`` (cvxpylayers 1.2) solves a batch as one cone program and
raises one ``SolverError`` for the whole batch when any element fails. :class:`ConvexLayer`
re-solves such a batch one element at a time, returns zeros for the elements that failed,
and reports them by index. One infeasible sample thus does not stop a training step, and
under DDP it does not leave the other processes waiting in an all-reduce.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cvxpy as cp
import torch
from cvxpylayers.torch import CvxpyLayer

logger = logging.getLogger(__name__)


@dataclass
class ConvexLayerStatus:
    """Outcome of the last call of a :class:`ConvexLayer`."""

    ok: torch.Tensor
    """Boolean per batch element (a single entry when unbatched): solved and finite."""
    messages: list[str]
    """``"solved"`` or the solver's error message, per batch element."""

    @property
    def failed_indices(self) -> list[int]:
        """Batch indices whose solve failed."""
        return torch.nonzero(~self.ok).flatten().tolist()


def _solver_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [cp.error.SolverError]
    try:
        from diffcp.cone_program import SolverError as DiffcpSolverError

        errors.append(DiffcpSolverError)
    except ImportError:  # diffcp is optional when another cvxpylayers backend is used
        pass
    return tuple(errors)


class ConvexLayer(torch.nn.Module):
    """Differentiable layer solving a parametrized CVXPY problem with cvxpylayers.

    Args:
        problem: A DPP-compliant CVXPY problem (``problem.is_dpp()`` is True).
        parameters: The CVXPY parameters filled at call time, in call order.
        variables: The CVXPY variables whose optimal values are returned, in order.
        solver_args: Keyword arguments for the cone solver (for example ``{"eps": 1e-8}``).

    Raises:
        TypeError: If ``problem`` is not a ``cvxpy.Problem``.
        ValueError: If the problem is not DPP, or parameters/variables do not match it.
    """

    def __init__(
        self,
        problem: cp.Problem,
        parameters: list[cp.Parameter],
        variables: list[cp.Variable],
        solver_args: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(problem, cp.Problem):
            raise TypeError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}.")
        if not problem.is_dpp():
            raise ValueError(
                "problem is not DPP-compliant, so cvxpylayers cannot differentiate it; rewrite "
                "it so parameters enter affinely (see cvxpy's 'Disciplined Parametrized "
                "Programming' documentation)."
            )
        known = {p.id for p in problem.parameters()}
        for parameter in parameters:
            if parameter.id not in known:
                raise ValueError(f"Parameter {parameter.name()} is not a parameter of problem.")
        if len(parameters) != len(known):
            raise ValueError(
                f"parameters lists {len(parameters)} parameters but problem has {len(known)}; "
                "pass every parameter of the problem."
            )
        variable_ids = {v.id for v in problem.variables()}
        for variable in variables:
            if variable.id not in variable_ids:
                raise ValueError(f"Variable {variable.name()} is not a variable of problem.")
        self.parameter_names = [p.name() for p in parameters]
        self.parameter_shapes = [tuple(p.shape) for p in parameters]
        self.solver_args = dict(solver_args or {})
        self.layer = CvxpyLayer(problem, parameters=parameters, variables=variables)
        self.variable_shapes = [tuple(v.shape) for v in variables]
        self.last_status: ConvexLayerStatus | None = None

    def _validate(self, values: tuple[torch.Tensor, ...]) -> int | None:
        if len(values) != len(self.parameter_shapes):
            raise ValueError(
                f"Expected {len(self.parameter_shapes)} tensors for parameters "
                f"{self.parameter_names}, received {len(values)}."
            )
        batch_sizes = set()
        for name, shape, value in zip(
            self.parameter_names, self.parameter_shapes, values, strict=True
        ):
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"Parameter {name} must be a torch.Tensor, got {type(value).__name__}."
                )
            if tuple(value.shape) == shape:
                continue
            if value.dim() == len(shape) + 1 and tuple(value.shape[1:]) == shape:
                batch_sizes.add(value.shape[0])
                continue
            raise ValueError(
                f"Parameter {name} expects shape {shape} or (batch, *{shape}); received "
                f"{tuple(value.shape)}."
            )
        if len(batch_sizes) > 1:
            raise ValueError(
                f"Batched parameters disagree on the batch size: {sorted(batch_sizes)}."
            )
        return batch_sizes.pop() if batch_sizes else None

    def _non_finite_elements(self, values: tuple[torch.Tensor, ...], batch: int | None):
        """Return a per-element mask of NaN or infinite batched values.

        Raises:
            ValueError: if a parameter without a batch dimension has non-finite values,
                because that would fail every element.
        """
        bad = torch.zeros(batch or 1, dtype=torch.bool, device=values[0].device)
        for name, shape, value in zip(
            self.parameter_names, self.parameter_shapes, values, strict=True
        ):
            finite = torch.isfinite(value.detach())
            if value.dim() == len(shape):
                if not bool(finite.all()):
                    raise ValueError(
                        f"Parameter {name} contains NaN or infinite values; pass finite values."
                    )
                continue
            bad |= ~finite.reshape(value.shape[0], -1).all(dim=1)
        return bad

    def _solve_each(
        self, values: tuple[torch.Tensor, ...], batch: int, skip: torch.Tensor
    ) -> tuple:
        errors = _solver_errors()
        solved: list[tuple[torch.Tensor, ...] | None] = []
        messages: list[str] = []
        for index in range(batch):
            if bool(skip[index]):
                # The cone solver fails on NaN or infinite data without naming the element.
                solved.append(None)
                messages.append("parameter values are NaN or infinite")
                continue
            element = tuple(
                v[index : index + 1] if v.dim() == len(shape) + 1 else v
                for v, shape in zip(values, self.parameter_shapes, strict=True)
            )
            try:
                outputs = self.layer(*element, solver_args=self.solver_args)
            except errors as error:
                solved.append(None)
                messages.append(str(error))
                continue
            if all(bool(torch.isfinite(o).all()) for o in outputs):
                solved.append(outputs)
                messages.append("solved")
            else:
                solved.append(None)
                messages.append("solver returned non-finite values")
        reference = values[0]
        results = []
        for position, shape in enumerate(self.variable_shapes):
            rows = [
                item[position]
                if item is not None
                else torch.zeros((1, *shape), dtype=reference.dtype, device=reference.device)
                for item in solved
            ]
            results.append(torch.cat(rows, dim=0))
        ok = torch.tensor([item is not None for item in solved], device=reference.device)
        return tuple(results), ConvexLayerStatus(ok, messages)

    def forward(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Solve for the given parameter values; returns one tensor per variable.

        Failed elements of a batch, including those with NaN or infinite parameter values,
        come back as zeros (with zero gradient); their indices are in :attr:`last_status`
        and in a logged warning. An unbatched call that fails raises ``RuntimeError``, and
        non-finite values in a parameter without a batch dimension raise ``ValueError``.
        """
        batch = self._validate(values)
        non_finite = self._non_finite_elements(values, batch)
        finite = False
        try:
            if not bool(non_finite.any()):
                outputs = self.layer(*values, solver_args=self.solver_args)
                finite = all(bool(torch.isfinite(o).all()) for o in outputs)
        except _solver_errors() as error:
            if batch is None:
                raise RuntimeError(f"Convex layer solve failed: {error}") from error
        if finite:
            size = 1 if batch is None else batch
            self.last_status = ConvexLayerStatus(
                torch.ones(size, dtype=torch.bool, device=values[0].device), ["solved"] * size
            )
            return tuple(outputs)
        if batch is None:
            raise RuntimeError("Convex layer solve returned non-finite values.")
        outputs, status = self._solve_each(values, batch, non_finite)
        self.last_status = status
        failed = status.failed_indices
        logger.warning(
            "Convex layer: %d of %d batch elements failed, indices %s: %s",
            len(failed),
            batch,
            failed,
            sorted({status.messages[i] for i in failed}),
        )
        return outputs
