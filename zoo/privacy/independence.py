"""Check that a training step treats the examples of a batch independently.

Per-example clipping bounds one example's influence on a DP-SGD step only if the loss is a
mean of per-example terms, each depending on its own example alone. Layers that mix the
examples of a batch break that silently: BatchNorm, an adaptive ODE solver whose step size
is shared by the batch, a loss over pairs of examples. Opacus' hooks fail on some of these
models by accident, but expanded weights and ghost clipping return gradients for any
model. This module therefore tests the property itself: the gradient of the loss on two examples must equal the mean of the gradients of
each example alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

#: Largest relative difference between the two-example gradient and the mean of the
#: single-example gradients that still counts as independent. Float32 rounding of batched
#: and single-example kernels gave 5.5e-8 for the Adult MLP of ``dp-adult``.
TOLERANCE = 1e-3


def slice_batch(batch: Any, index: slice, size: int) -> Any:
    """Return ``batch`` with every tensor whose first dimension is ``size`` sliced by ``index``."""
    if isinstance(batch, torch.Tensor):
        return batch[index] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {key: slice_batch(value, index, size) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(slice_batch(value, index, size) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(slice_batch(value, index, size) for value in batch)
    return batch


def coupling(
    pl_module: pl.LightningModule,
    training_step: Callable[..., Any],
    batch: Any,
    batch_idx: int,
    size: int,
) -> float:
    """Return how much the first two examples of ``batch`` influence each other's gradients.

    The value is ``||g(x0, x1) - (g(x0) + g(x1)) / 2|| / ||(g(x0) + g(x1)) / 2||``, where
    ``g`` is the gradient of the training step's loss with respect to the trainable
    parameters. It is zero, up to rounding, when the loss is a mean of independent
    per-example losses. The module runs in eval mode (no dropout) with its logging
    switched off, and the random number generators are restored afterwards.

    Args:
        pl_module: The module whose parameters to differentiate.
        training_step: The module's own training step (not a wrapper of a DP mode).
        batch: A training batch with at least two examples.
        batch_idx: Index passed on to ``training_step``.
        size: The number of examples in ``batch``.
    """
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
        pl_module.eval()
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # Opacus' backward hooks stay registered (switched off) during the check.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            pair = gradient(slice(0, 2))
            mean = (gradient(slice(0, 1)) + gradient(slice(1, 2))) / 2
    finally:
        del pl_module.log, pl_module.log_dict
        for module, mode in training.items():
            module.training = mode
    return ((pair - mean).norm() / mean.norm().clamp_min(1e-12)).item()


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
