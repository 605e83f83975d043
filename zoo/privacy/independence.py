"""Audit of a DP training step on two examples: independence and per-example gradients.

Per-example clipping bounds one example's influence on a DP-SGD step only if the loss is a
mean of per-example terms, each depending on its own example alone. Layers that mix the
examples of a batch break that silently: BatchNorm, an adaptive ODE solver that couples
the batch, a loss over pairs of examples. Opacus' hooks fail on some of these models by
accident, but expanded weights and ghost clipping return gradients for any model. The
audit therefore tests the property itself: the gradient of the loss on two examples must
equal the mean of the gradients of each example alone.

It also checks the per-example gradients of the DP mode against each example's own
gradient, because a mode can miss part of a parameter's use. Opacus' hooks and ghost
clipping see a parameter only inside the layer that owns it. A weight penalty, or a weight
that another layer reuses, would then stay unclipped.

NOTE: the audit runs once, on two examples, so it can miss mixing that depends on the
batch's content (mixup that happens to pair an example with itself, class centroids of a
batch with one class), mixing that starts after the first step, and a penalty whose
gradient is zero at the first step. Its four extra training steps also reach whatever
the training step updates besides the loss (metrics, counters, queues).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

#: Largest relative difference between the two-example gradient and the mean of the
#: single-example gradients that still counts as independent. Float32 rounding of batched
#: and single-example kernels gave 5.5e-8 for the Adult MLP of ``dp-adult``.
TOLERANCE = 1e-3

#: Layers switched to eval mode during the check: their randomness is per example, and
#: masks drawn in separate passes would differ.
DROPOUT_LAYERS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def slice_batch(batch: Any, index: slice, size: int) -> Any:
    """Return ``batch`` with every tensor whose first dimension is ``size`` sliced by ``index``."""
    if isinstance(batch, torch.Tensor):
        return batch[index] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {key: slice_batch(value, index, size) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(slice_batch(value, index, size) for value in batch))
    if (
        isinstance(batch, list)
        and len(batch) == size
        and not any(isinstance(value, (torch.Tensor, Mapping, list, tuple)) for value in batch)
    ):
        return batch[index]  # One plain value per example, such as file names.
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(value, index, size) for value in batch)
    return batch


@dataclass
class AuditResult:
    """Measurements of :func:`audit` on the first two examples of a batch."""

    #: ``||g(x0, x1) - (g(x0) + g(x1)) / 2|| / ||(g(x0) + g(x1)) / 2||``.
    coupling: float
    #: Per parameter name, the largest relative difference between what the DP mode
    #: computes for an example and that example's own gradient (or its norm, for ghost).
    mode_errors: dict[str, float]
    #: The exception the training step raised on a single example, if any.
    single_example_error: BaseException | None = None
    #: Whether the two-example gradient is the sum, not the mean, of the single ones.
    sum_reduced: bool = False


def audit(
    pl_module: pl.LightningModule,
    training_step: Callable[..., Any],
    mode_output: Callable[[Any], torch.Tensor],
    batch: Any,
    batch_idx: int,
    size: int,
) -> AuditResult:
    """Compare, on the first two examples of ``batch``, three ways of getting their gradients.

    ``g(x)`` is the gradient of the training step's loss with respect to the trainable
    parameters, by plain autograd. The coupling compares the gradient on both examples with
    the mean of the single-example gradients. The mode check compares ``mode_output`` on
    both examples, one row per example (a flat gradient, or a gradient norm for ghost
    clipping), with ``g(x0)`` and ``g(x1)``.

    The module stays in training mode, except for dropout layers, which are per-example
    anyway and would otherwise draw different masks in each pass. Its logging is switched
    off, and the random number generators are restored afterwards.

    Args:
        pl_module: The module whose parameters to differentiate.
        training_step: The module's own training step (not a wrapper of a DP mode).
        mode_output: Runs the DP mode on a batch and returns per-example gradients
            ``[n, P]`` (flattened like ``pl_module.parameters()``) or norms ``[n]``.
        batch: A training batch with at least two examples.
        batch_idx: Index passed on to ``training_step``.
        size: The number of examples in ``batch``.
    """
    names = [name for name, p in pl_module.named_parameters() if p.requires_grad]
    parameters = [p for p in pl_module.parameters() if p.requires_grad]
    training = {module: module.training for module in pl_module.modules()}

    def gradient(index: slice) -> torch.Tensor:
        output = training_step(slice_batch(batch, index, size), batch_idx)
        loss = output["loss"] if isinstance(output, Mapping) else output
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        return torch.cat(
            [
                (torch.zeros_like(p) if g is None else g).flatten().double()
                for p, g in zip(parameters, grads, strict=True)
            ]
        )

    pl_module.log = _no_log  # type: ignore[method-assign]
    pl_module.log_dict = _no_log  # type: ignore[method-assign]
    try:
        for module in pl_module.modules():
            if isinstance(module, DROPOUT_LAYERS):
                module.eval()
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # Opacus' backward hooks stay registered (switched off) during the check.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            try:
                singles = [gradient(slice(0, 1)), gradient(slice(1, 2))]
            except Exception as error:  # noqa: BLE001 - reported to the caller
                return AuditResult(float("inf"), {}, single_example_error=error)
            pair = gradient(slice(0, 2))
            produced = mode_output(slice_batch(batch, slice(0, 2), size)).double()
    finally:
        del pl_module.log, pl_module.log_dict
        for module, mode in training.items():
            module.training = mode
    mean = (singles[0] + singles[1]) / 2
    coupling = ((pair - mean).norm() / mean.norm().clamp_min(1e-12)).item()
    summed = ((pair - 2 * mean).norm() / (2 * mean).norm().clamp_min(1e-12)).item()
    errors = _mode_errors(produced, singles, parameters, names)
    return AuditResult(coupling, errors, sum_reduced=summed <= TOLERANCE)


def _mode_errors(
    produced: torch.Tensor,
    singles: list[torch.Tensor],
    parameters: list[torch.Tensor],
    names: list[str],
) -> dict[str, float]:
    """Return the relative error of the mode's per-example output, per parameter name."""
    if produced.dim() == 1:  # Ghost clipping gives only the norm of each example's gradient.
        errors = [
            abs(produced[i].item() - single.norm().item()) / max(single.norm().item(), 1e-12)
            for i, single in enumerate(singles)
        ]
        return {"(gradient norm)": max(errors)}
    sizes = [p.numel() for p in parameters]
    result: dict[str, float] = {}
    for i, single in enumerate(singles):
        scale = max(single.norm().item(), 1e-12)
        for name, mine, reference in zip(
            names, produced[i].split(sizes), single.split(sizes), strict=True
        ):
            error = (mine - reference).norm().item() / scale
            result[name] = max(result.get(name, 0.0), error)
    return result


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
