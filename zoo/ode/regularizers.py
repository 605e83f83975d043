"""Regularizers that make a neural ODE cheaper to solve with an adaptive solver.

Each regularizer maps one solve to a scalar penalty that is added to the task loss:

- :class:`NoRegularizer`: zero, for the unregularized baseline.
- :class:`ErrorEstimateRegularizer` (ERNODE): the solver's scaled local error estimates.
- :class:`StiffnessEstimateRegularizer` (SRNODE): the solver's stiffness estimates.
- :class:`CombinedRegularizer`: a weighted sum of other regularizers.
- :class:`KineticJacobianRegularizer` (RNODE): kinetic energy plus the Frobenius norm of
  the Jacobian of the vector field, integrated along the trajectory through extra state
  channels.

ERNODE and SRNODE follow Pal, Ma, Shah and Rackauckas, "Opening the Blackbox: Accelerating
Neural Differential Equations by Regularizing Internal Solver Heuristics" (ICML 2021).
The paper sums over accepted steps, while its reference implementation takes the mean of
the error terms and the maximum of the stiffness terms, and divides the stiffness estimate
by the size of the solver's stability region. Both choices are constructor arguments here,
and the defaults follow the reference implementation. RNODE follows Finlay, Jacobsen,
Nurbekyan and Oberman, "How to train your neural ODE: the world of Jacobian and kinetic
energy regularization" (ICML 2020).

With per-sample step sizes every sample has its own accepted steps, so the penalties are
reduced over each sample's own steps (``step_mask``) and then averaged over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from zoo.ode.solver import SolverStats, stability_region_size

VectorField = Callable[[Tensor, Tensor], Tensor]

STEP_REDUCTIONS = ("mean", "sum", "max")


def _check_reduction(reduction: str, allowed: Sequence[str]) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction={reduction!r} is not supported; use one of {list(allowed)}.")


def _check_nonnegative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} is invalid; use a finite number >= 0.")


def reduce_over_steps(values: Tensor, step_mask: Tensor, reduction: str) -> Tensor:
    """Reduce per-step values ``[n_steps, batch]`` to one scalar.

    Each sample is reduced over the steps it really took (``step_mask``), then the result
    is averaged over the batch. Steps that a sample did not take contribute nothing, and a
    sample without accepted steps contributes zero.

    Args:
        values: Per-step, per-sample values, shape ``[n_steps, batch]``.
        step_mask: Boolean mask of the same shape, true where the sample took the step.
        reduction: ``"mean"``, ``"sum"`` or ``"max"`` over steps. ``"max"`` assumes
            non-negative values, because masked steps are filled with zero.

    Returns:
        A scalar tensor that keeps the gradient of ``values``.
    """
    _check_reduction(reduction, STEP_REDUCTIONS)
    if values.shape != step_mask.shape:
        raise ValueError(
            f"values has shape {tuple(values.shape)} but step_mask has shape "
            f"{tuple(step_mask.shape)}; both must be [n_steps, batch]."
        )
    if values.numel() == 0:
        return values.new_zeros(())
    mask = step_mask.to(values.dtype)
    masked = values * mask
    if reduction == "sum":
        per_sample = masked.sum(dim=0)
    elif reduction == "mean":
        per_sample = masked.sum(dim=0) / mask.sum(dim=0).clamp_min(1.0)
    else:
        per_sample = masked.amax(dim=0)
    return per_sample.mean()


class ODERegularizer(nn.Module):
    """Base class: a penalty computed from one solve.

    Subclasses that need extra state channels (integrals along the trajectory) set
    :attr:`augmented_channels` and implement :meth:`augment`. The ODE block appends that
    many zero channels to the state, integrates ``augment(func)`` in place of ``func`` during
    training and passes the final values of the extra channels to :meth:`forward`.
    """

    augmented_channels: int = 0

    def augment(self, func: VectorField, state_size: int) -> VectorField:
        """Return the vector field of the augmented state ``[y, extra channels]``."""
        raise NotImplementedError(f"{type(self).__name__} does not use augmented state channels.")

    def forward(self, stats: SolverStats, augmented: Tensor | None = None) -> dict[str, Tensor]:
        """Compute the named penalty terms of one solve.

        Args:
            stats: Statistics of the solve, with per-step estimates ``[n_accepted, batch]``.
            augmented: Final values of the extra state channels ``[batch, augmented_channels]``,
                or ``None`` when the solve was not augmented (for example at evaluation).

        Returns:
            Named scalar terms. The key ``"total"`` is the penalty added to the loss.
        """
        raise NotImplementedError


class NoRegularizer(ODERegularizer):
    """Zero penalty, for the unregularized baseline."""

    def forward(self, stats: SolverStats, augmented: Tensor | None = None) -> dict[str, Tensor]:
        """Return a zero ``"total"`` term on the device of the solve."""
        device = stats.step_sizes.device if stats.step_sizes is not None else None
        return {"total": torch.zeros((), device=device)}


class ErrorEstimateRegularizer(ODERegularizer):
    """ERNODE: penalize the solver's scaled local error estimates.

    For every accepted step ``j`` the term is ``EEst_j * |dt_j|``, where ``EEst_j`` is the
    scaled RMS error norm that the step-size controller uses (a step is accepted when it
    is at most 1). The paper sums the terms over steps, the reference implementation takes
    their mean, which keeps the scale independent of the number of steps.

    Args:
        reduction: ``"mean"`` (reference implementation) or ``"sum"`` (paper) over steps.
        multiply_step_size: Multiply each estimate by ``|dt_j|``. Both the paper and the
            reference implementation do; ``False`` penalizes the bare estimates.
    """

    def __init__(self, reduction: str = "mean", multiply_step_size: bool = True) -> None:
        super().__init__()
        _check_reduction(reduction, ("mean", "sum"))
        self.reduction = reduction
        self.multiply_step_size = multiply_step_size

    def forward(self, stats: SolverStats, augmented: Tensor | None = None) -> dict[str, Tensor]:
        """Return ``{"error_estimate": R_E, "total": R_E}``."""
        values = stats.error_estimates
        if self.multiply_step_size:
            values = values * stats.step_sizes.abs()
        penalty = reduce_over_steps(values, stats.step_mask, self.reduction)
        return {"error_estimate": penalty, "total": penalty}


class StiffnessEstimateRegularizer(ODERegularizer):
    """SRNODE: penalize the solver's stiffness estimates.

    For every accepted step the solver estimates the dominant eigenvalue of the Jacobian as
    ``||k7 - k6|| / ||g7 - g6||`` from its last two stages. The term is the absolute value
    of that estimate, optionally divided by the size of the method's stability region along
    the negative real axis (3.5068 for Tsit5). Non-finite estimates, such as the 0/0 ratio
    when the two stage points coincide, count as zero.

    Args:
        reduction: ``"max"`` (reference implementation), ``"mean"`` or ``"sum"`` (paper)
            over steps.
        method: Solver method whose stability region scales the estimate, for example
            ``"tsit5"``. ``None`` leaves the estimate unscaled.
    """

    def __init__(self, reduction: str = "max", method: str | None = "tsit5") -> None:
        super().__init__()
        _check_reduction(reduction, STEP_REDUCTIONS)
        self.reduction = reduction
        self.method = method
        self.scale = 1.0 if method is None else float(stability_region_size(method))

    def forward(self, stats: SolverStats, augmented: Tensor | None = None) -> dict[str, Tensor]:
        """Return ``{"stiffness_estimate": R_S, "total": R_S}``."""
        estimates = stats.stiffness_estimates
        finite = torch.isfinite(estimates)
        values = torch.where(finite, estimates, torch.zeros_like(estimates)).abs() / self.scale
        penalty = reduce_over_steps(values, stats.step_mask, self.reduction)
        return {"stiffness_estimate": penalty, "total": penalty}


class CombinedRegularizer(ODERegularizer):
    """Weighted sum of several regularizers.

    The reference implementation's combined ERNODE+SRNODE penalty is the mean over steps of
    ``EEst_j * dt_j + 0.1 * lambda_j / 3.5068``; it is ``CombinedRegularizer([ERNODE(mean),
    SRNODE(mean, "tsit5")], [1.0, 0.1])``.

    Args:
        regularizers: The parts. Their terms are reported under their own names, and the
            ``"total"`` of the combination is the weighted sum of their totals.
        weights: One non-negative weight per part.
    """

    def __init__(self, regularizers: Sequence[ODERegularizer], weights: Sequence[float]) -> None:
        super().__init__()
        if len(regularizers) == 0:
            raise ValueError("CombinedRegularizer needs at least one regularizer, got none.")
        if len(regularizers) != len(weights):
            raise ValueError(
                f"Got {len(regularizers)} regularizers but {len(weights)} weights; "
                "pass one weight per regularizer."
            )
        for index, weight in enumerate(weights):
            _check_nonnegative(f"weights[{index}]", weight)
        self.parts = nn.ModuleList(regularizers)
        self.weights = [float(weight) for weight in weights]
        self.augmented_channels = sum(part.augmented_channels for part in self.parts)

    def augment(self, func: VectorField, state_size: int) -> VectorField:
        """Chain the augmentations of the parts; their channels follow the state in order."""
        augmenting = [part for part in self.parts if part.augmented_channels > 0]
        if len(augmenting) > 1:
            raise ValueError(
                "CombinedRegularizer supports at most one part with augmented state channels, "
                f"got {[type(part).__name__ for part in augmenting]}."
            )
        return augmenting[0].augment(func, state_size)

    def forward(self, stats: SolverStats, augmented: Tensor | None = None) -> dict[str, Tensor]:
        """Return the terms of every part and their weighted ``"total"``."""
        terms: dict[str, Tensor] = {}
        total: Tensor | None = None
        for part, weight in zip(self.parts, self.weights, strict=True):
            part_augmented = augmented if part.augmented_channels > 0 else None
            part_terms = part(stats, part_augmented)
            for name, value in part_terms.items():
                if name != "total":
                    terms[name] = value
            contribution = weight * part_terms["total"]
            total = contribution if total is None else total + contribution
        terms["total"] = total
        return terms


class KineticJacobianRegularizer(ODERegularizer):
    """RNODE: kinetic energy and Jacobian Frobenius norm integrated along the trajectory.

    Two extra state channels integrate ``||f(t, y)||^2 / D`` and ``||eps^T J||^2 / D``, where
    ``J = df/dy``, ``D`` is the state size and ``eps ~ N(0, I)`` is drawn once per solve, so
    that the second channel is a Hutchinson estimate of ``||J||_F^2 / D``. Dividing by ``D``
    keeps the weights independent of the state size. The integrals are taken only in
    training mode, because evaluating ``eps^T J`` needs autograd inside the vector field.

    Args:
        kinetic_weight: Weight of the kinetic energy integral.
        jacobian_weight: Weight of the Jacobian Frobenius norm integral.
    """

    augmented_channels = 2

    def __init__(self, kinetic_weight: float = 1.0, jacobian_weight: float = 1.0) -> None:
        super().__init__()
        _check_nonnegative("kinetic_weight", kinetic_weight)
        _check_nonnegative("jacobian_weight", jacobian_weight)
        self.kinetic_weight = float(kinetic_weight)
        self.jacobian_weight = float(jacobian_weight)

    def augment(self, func: VectorField, state_size: int) -> VectorField:
        """Return the vector field of ``[y, kinetic integral, Jacobian integral]``."""
        noise: dict[str, Tensor] = {}

        def augmented_func(t: Tensor, state: Tensor) -> Tensor:
            with torch.enable_grad():
                y = state[..., :state_size]
                if not y.requires_grad:
                    y = y.detach().requires_grad_(True)
                dy = func(t, y)
                if "eps" not in noise or noise["eps"].shape != dy.shape:
                    noise["eps"] = torch.randn_like(dy)
                (vjp,) = torch.autograd.grad(dy, y, noise["eps"], create_graph=True)
            kinetic = dy.pow(2).mean(dim=-1, keepdim=True)
            jacobian = vjp.pow(2).mean(dim=-1, keepdim=True)
            return torch.cat([dy, kinetic, jacobian], dim=-1)

        return augmented_func

    def forward(self, stats: SolverStats, augmented: Tensor | None = None) -> dict[str, Tensor]:
        """Return the batch means of both integrals and their weighted ``"total"``."""
        if augmented is None:
            device = stats.step_sizes.device if stats.step_sizes is not None else None
            zero = torch.zeros((), device=device)
            return {"total": zero}
        kinetic = augmented[..., 0].mean()
        jacobian = augmented[..., 1].mean()
        total = self.kinetic_weight * kinetic + self.jacobian_weight * jacobian
        return {"kinetic_energy": kinetic, "jacobian_frobenius": jacobian, "total": total}


REGULARIZER_NAMES = ("none", "ernode", "srnode", "ernode+srnode", "rnode")


def build_regularizer(name: str, **kwargs: Any) -> ODERegularizer:
    """Build a regularizer by name.

    Args:
        name: ``"none"``, ``"ernode"``, ``"srnode"``, ``"ernode+srnode"`` or ``"rnode"``.
        **kwargs: Constructor arguments. For ``"ernode+srnode"`` the keys are
            ``error_reduction`` (default ``"mean"``), ``stiffness_reduction`` (default
            ``"mean"``), ``method`` (default ``"tsit5"``) and ``stiffness_weight`` (default
            0.1), which reproduce the reference implementation's combined penalty.

    Raises:
        ValueError: If ``name`` is unknown.
        TypeError: If ``kwargs`` contains an argument the regularizer does not take.
    """
    if name == "none":
        if kwargs:
            raise TypeError(f"Regularizer 'none' takes no arguments, got {sorted(kwargs)}.")
        return NoRegularizer()
    if name == "ernode":
        return ErrorEstimateRegularizer(**kwargs)
    if name == "srnode":
        return StiffnessEstimateRegularizer(**kwargs)
    if name == "rnode":
        return KineticJacobianRegularizer(**kwargs)
    if name == "ernode+srnode":
        options = dict(kwargs)
        error = ErrorEstimateRegularizer(reduction=options.pop("error_reduction", "mean"))
        stiffness = StiffnessEstimateRegularizer(
            reduction=options.pop("stiffness_reduction", "mean"),
            method=options.pop("method", "tsit5"),
        )
        stiffness_weight = options.pop("stiffness_weight", 0.1)
        if options:
            raise TypeError(
                f"Unknown arguments {sorted(options)} for regularizer 'ernode+srnode'; valid: "
                "error_reduction, stiffness_reduction, method, stiffness_weight."
            )
        return CombinedRegularizer([error, stiffness], [1.0, stiffness_weight])
    raise ValueError(f"Unknown regularizer {name!r}; choose one of {list(REGULARIZER_NAMES)}.")


def resolve_anneal_epochs(
    anneal_epochs: int | None, final: float | None, max_epochs: int | None
) -> int:
    """Return the length of the weight decay in epochs for :func:`annealed_weight`.

    Args:
        anneal_epochs: The configured length, or ``None`` to use ``max_epochs``.
        final: The weight to decay to; ``None`` means a constant weight.
        max_epochs: ``trainer.max_epochs``, or ``None`` outside a ``Trainer``.

    Raises:
        ValueError: If the weight decays, no length is configured and ``max_epochs`` is
            not a positive number, as with ``trainer.max_epochs=-1``. A fallback length
            would let the weight decay by ``initial / final`` every epoch without end.
    """
    if anneal_epochs is not None:
        return anneal_epochs
    if max_epochs is not None and max_epochs > 0:
        return max_epochs
    if final is None or max_epochs is None:
        return 1
    raise ValueError(
        f"reg_weight_final={final} needs the length of the decay, but reg_anneal_epochs is "
        f"not set and trainer.max_epochs={max_epochs} is not a positive number of epochs. "
        "Set model.init_args.reg_anneal_epochs or trainer.max_epochs."
    )


def annealed_weight(
    epoch: int, initial: float, final: float | None = None, total_epochs: int | None = None
) -> float:
    """Return the regularization weight of ``epoch`` under exponential decay.

    ``lambda(e) = initial * exp(-e * ln(initial / final) / total_epochs)``, the schedule of
    the ERNODE reference implementation: ``initial`` at epoch 0, ``final`` at epoch
    ``total_epochs`` (so the last trained epoch ``total_epochs - 1`` is slightly above it).
    With ``final=None`` the weight stays ``initial``.

    Args:
        epoch: Current epoch, counted from 0.
        initial: Weight at epoch 0 (``lambda0``), >= 0.
        final: Weight at epoch ``total_epochs`` (``lambda1``), > 0, or ``None`` for constant.
        total_epochs: Length ``E`` of the schedule in epochs; needed when ``final`` is set.
            Epochs past ``total_epochs`` keep decaying at the same rate.

    Raises:
        ValueError: On a negative epoch or weight, or a missing ``total_epochs``.
    """
    if epoch < 0:
        raise ValueError(f"epoch={epoch} is invalid; epochs count from 0.")
    _check_nonnegative("initial", initial)
    if final is None:
        return float(initial)
    _check_nonnegative("final", final)
    if initial == 0:
        return 0.0
    if final == 0:
        raise ValueError("final=0 cannot be reached by exponential decay; use a value > 0.")
    if total_epochs is None or total_epochs < 1:
        raise ValueError(
            f"total_epochs={total_epochs!r} is invalid with final={final}; pass the number of "
            "epochs over which the weight decays (>= 1), for example trainer.max_epochs."
        )
    return float(initial * math.exp(-epoch * math.log(initial / final) / total_epochs))
