"""Wiring of the DPSGD callback into the training step for each Opacus per-example mode.

Opacus offers four ways to compute per-example gradients, and each reaches into the
training step differently:

- ``hooks`` and ``functorch``: forward and backward hooks on the layers compute each
  example's gradient from the layer's input and output gradient. The callback attaches
  Opacus' hooks to the module Lightning runs. In ``functorch`` mode an empty Poisson batch
  skips the training step (:class:`EmptyBatchStep`), because torch.func needs an example.
- ``ew`` (expanded weights): the parameters are replaced, for the length of one training
  step, by PyTorch ``ExpandedWeight`` tensors, whose linear, convolution, embedding and
  normalization operations write each example's gradient to ``parameter.grad_sample`` during
  the ordinary backward pass. :class:`ExpandedWeightsStep` runs ``training_step`` that way.
- ``ghost`` (ghost clipping, Li et al., "Large Language Models Can Be Strong Differentially
  Private Learners", ICLR 2022): a first backward pass computes only the norms of the
  per-example gradients. A second one back-propagates the per-example losses weighted by
  their clipping factors, which gives the sum of clipped gradients without storing one
  gradient per example. The training step therefore returns the per-example losses under
  the key ``"per_example_loss"``, and :class:`GhostClippingStep` runs Opacus' two passes in
  place of Lightning's backward call.

``"auto"`` picks ``ew`` when every layer with trainable parameters is one that expanded
weights support, and ``hooks`` otherwise. Expanded weights were the fastest mode through
Lightning in ``benchmarks/privacy_opacus_modes.py`` (tied with ``hooks`` on MNIST).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from opacus.grad_sample import GradSampleHooksFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn
from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

#: Opacus per-sample gradient modes the DPSGD callback runs, plus ``"auto"``.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("auto", "hooks", "functorch", "ew", "ghost")

#: Key of the per-example losses in the dict that ``training_step`` returns, needed by ghost
#: clipping.
PER_EXAMPLE_LOSS_KEY = "per_example_loss"

#: Layer types whose operations PyTorch's expanded weights differentiate per example.
EXPANDED_WEIGHT_LAYERS: frozenset[type[nn.Module]] = frozenset(
    {
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.Embedding,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
    }
)


def layers_without_expanded_weights(module: nn.Module) -> list[str]:
    """Return the names of layers with trainable parameters that expanded weights cannot run.

    A subclass of a supported layer counts as unsupported, because its ``forward`` may use
    the parameters in other operations.
    """
    return [
        name or type(layer).__name__
        for name, layer in module.named_modules()
        if type(layer) not in EXPANDED_WEIGHT_LAYERS
        and any(parameter.requires_grad for parameter in layer.parameters(recurse=False))
    ]


def resolve_grad_sample_mode(mode: str, module: nn.Module) -> str:
    """Return the Opacus mode to run: ``mode`` itself, or the choice of ``"auto"``.

    Raises:
        ValueError: If ``mode`` is ``"ew"`` and some layer is not supported by expanded
            weights.
    """
    unsupported = layers_without_expanded_weights(module)
    if mode == "auto":
        return "hooks" if unsupported else "ew"
    if mode == "ew" and unsupported:
        raise ValueError(
            f"grad_sample_mode 'ew' cannot train layers {', '.join(unsupported)}: PyTorch's "
            "expanded weights compute per-example gradients only for "
            f"{', '.join(sorted(t.__name__ for t in EXPANDED_WEIGHT_LAYERS))}. "
            "Use grad_sample_mode 'hooks' (or 'auto', which picks it for this model)."
        )
    return mode


def batch_size_of(batch: Any) -> int:
    """Return the first dimension of the first batched tensor in a (nested) batch.

    Raises:
        LookupError: If the batch contains no tensor with at least one dimension.
    """
    if isinstance(batch, torch.Tensor) and batch.dim() > 0:
        return batch.shape[0]
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        items = []
    for item in items:
        try:
            return batch_size_of(item)
        except LookupError:
            continue
    raise LookupError(
        f"DP-SGD found no batched tensor in the training batch of type {type(batch).__name__}; "
        "per-example gradients need the examples along the first dimension of a tensor."
    )


class _TrainingStepCall(nn.Module):
    """Module whose forward is a LightningModule's training step, for ``functional_call``."""

    def __init__(self, pl_module: pl.LightningModule, step: Callable[..., Any]) -> None:
        super().__init__()
        self.module = pl_module
        self._step = step

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._step(*args, **kwargs)


class ExpandedWeightsStep:
    """Run a LightningModule's ``training_step`` with expanded-weight parameters.

    While installed, each call of ``pl_module.training_step`` swaps every trainable parameter
    for an ``ExpandedWeight`` of the batch's size, so that the backward pass Lightning runs
    afterwards leaves each example's gradient in ``parameter.grad_sample``. The training step
    must return the mean of the per-example losses, as Opacus' ``loss_reduction="mean"``
    assumes.

    Args:
        pl_module: The module whose training step to run.
    """

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self.pl_module = pl_module
        self._original = pl_module.training_step
        self._call = _TrainingStepCall(pl_module, self._original)

    def install(self) -> None:
        """Route ``pl_module.training_step`` through expanded weights."""
        self.pl_module.training_step = self._training_step  # type: ignore[method-assign]

    def remove(self) -> None:
        """Restore the module's own ``training_step``."""
        if self.pl_module.__dict__.get("training_step") == self._training_step:
            del self.pl_module.training_step

    def _training_step(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        size = batch_size_of(batch)
        if size == 0:
            return empty_batch_loss(self.pl_module)
        # Per-example gradients of the previous step are consumed by the optimizer step;
        # Lightning clears them only after this training step, and expanded weights refuse
        # to start while they exist.
        for parameter in self.pl_module.parameters():
            parameter.grad_sample = None
        run = call_for_per_sample_grads(self._call, batch_size=size, loss_reduction="mean")
        try:
            return run(batch, *args, **kwargs)
        except RuntimeError as error:
            if "Expanded Weights" not in str(error):
                raise
            raise ValueError(
                f"DP-SGD with grad_sample_mode 'ew': {error}. The training step of "
                f"{type(self.pl_module).__name__} uses a parameter in an operation that "
                "expanded weights cannot differentiate per example (they handle linear, "
                "convolution, embedding and normalization layers), for example a weight "
                "penalty or a parameter of the module itself. Put an L2 penalty into the "
                "optimizer's weight_decay, and move other uses into a layer with an Opacus "
                "grad sampler and grad_sample_mode 'hooks'."
            ) from error


def empty_batch_loss(pl_module: nn.Module) -> torch.Tensor:
    """Return a zero loss for an empty Poisson batch that leaves empty per-example gradients.

    Expanded weights and torch.func need at least one example. The optimizer still adds
    the noise, because an empty batch is a valid draw of Poisson sampling.
    """
    parameters = [p for p in pl_module.parameters() if p.requires_grad]
    loss = torch.stack([0.0 * parameter.sum() for parameter in parameters]).sum()

    def set_empty_grad_samples(grad: torch.Tensor) -> None:
        # Runs in the backward pass, after Lightning's zero_grad cleared grad_sample.
        for parameter in parameters:
            parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))

    loss.register_hook(set_empty_grad_samples)
    return loss


class EmptyBatchStep:
    """Run ``training_step`` as it is, except on an empty batch (for the ``functorch`` mode).

    Args:
        pl_module: The module whose training step to run.
    """

    def __init__(self, pl_module: pl.LightningModule) -> None:
        self.pl_module = pl_module
        self._original = pl_module.training_step

    def install(self) -> None:
        """Route ``pl_module.training_step`` through the empty-batch check."""
        self.pl_module.training_step = self._training_step  # type: ignore[method-assign]

    def remove(self) -> None:
        """Restore the module's own ``training_step``."""
        if self.pl_module.__dict__.get("training_step") == self._training_step:
            del self.pl_module.training_step

    def _training_step(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if batch_size_of(batch) == 0:
            return empty_batch_loss(self.pl_module)
        return self._original(batch, *args, **kwargs)


class GhostClippingStep:
    """Replace Lightning's backward call by Opacus' two ghost-clipping passes.

    While installed, ``pl_module.training_step`` must return a dict with ``"loss"``, the mean
    of the per-example losses, and ``"per_example_loss"``, a vector of one loss per example.
    The backward call then back-propagates the per-example losses twice: once to get the
    norms of the per-example gradients, and once weighted by their clipping factors.

    Args:
        pl_module: The module to train.
        hooks: Opacus' ghost-clipping hooks attached to the module Lightning runs.
        optimizer: Returns the Opacus optimizer Lightning steps (built after the hooks).
    """

    def __init__(
        self,
        pl_module: pl.LightningModule,
        hooks: GradSampleHooksFastGradientClipping,
        optimizer: Callable[[], DPOptimizerFastGradientClipping],
    ) -> None:
        self.pl_module = pl_module
        self.hooks = hooks
        self.optimizer = optimizer
        self._original = pl_module.training_step
        self._pending: torch.Tensor | None = None

    def install(self) -> None:
        """Route the module's training step and backward call through ghost clipping."""
        self.pl_module.training_step = self._training_step  # type: ignore[method-assign]
        self.pl_module.backward = self._backward  # type: ignore[method-assign]

    def remove(self) -> None:
        """Restore the module's own ``training_step`` and ``backward``."""
        for name, patched in (("training_step", self._training_step), ("backward", self._backward)):
            if self.pl_module.__dict__.get(name) == patched:
                delattr(self.pl_module, name)
        self._pending = None

    def _training_step(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        output = self._original(batch, *args, **kwargs)
        self._pending = per_example_losses(output, batch_size_of(batch), self.pl_module)
        return output

    def _backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self._pending is None:
            raise RuntimeError(
                "DP-SGD ghost clipping: backward was called without a training step before "
                "it; only Lightning's automatic optimization can run this mode."
            )
        per_example, self._pending = self._pending, None
        DPTensorFastGradientClipping(
            self.hooks, self.optimizer(), per_example, loss_reduction="mean"
        ).backward()
        self._check_clipped_sum()

    def _check_clipped_sum(self) -> None:
        """Raise if the clipped sum is longer than the sum of the clipped per-example norms.

        Ghost clipping scales each example's loss by its clipping factor, computed from the
        gradient norms inside the layers that own the parameters. A parameter that also
        receives gradient elsewhere (a penalty in the per-example loss, a weight used by a
        second layer) makes the weighted sum longer than the triangle inequality allows.
        Checked on every step, it costs one norm over the gradients.
        """
        norms = self.hooks.per_sample_gradient_norms
        bound = (self.hooks.get_clipping_coef() * norms).sum().item()
        grads = [p.grad for p in self.hooks.trainable_parameters if p.grad is not None]
        if not grads:
            return
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads])
        ).item()
        if total > bound * (1 + 1e-3) + 1e-6:
            raise RuntimeError(
                f"DP-SGD ghost clipping: the clipped gradient sum has norm {total:.4g}, more "
                f"than the {bound:.4g} that clipping allows, so some parameter receives "
                "gradient outside the layer that owns it (a penalty inside "
                "'per_example_loss', a weight reused by another layer or by a functional "
                "call). That part is not clipped. Put an L2 penalty into the optimizer's "
                "weight_decay, or use grad_sample_mode 'ew'."
            )


def per_example_losses(output: Any, batch_size: int, pl_module: nn.Module) -> torch.Tensor:
    """Return the checked per-example losses of a training step's output for ghost clipping.

    Raises:
        ValueError: If the output has no ``"per_example_loss"`` vector of the batch's length,
            or if its ``"loss"`` is not their mean (ghost clipping would then drop the rest
            of the loss, for example a regularizer).
    """
    name = type(pl_module).__name__
    if not isinstance(output, Mapping) or PER_EXAMPLE_LOSS_KEY not in output:
        raise ValueError(
            f"grad_sample_mode 'ghost' needs {name}.training_step to return a dict with "
            f"'loss' and {PER_EXAMPLE_LOSS_KEY!r} (one loss per example, for instance "
            "F.cross_entropy(logits, y, reduction='none')); it returned "
            f"{type(output).__name__}. Return both, or use grad_sample_mode 'hooks'."
        )
    per_example = output[PER_EXAMPLE_LOSS_KEY]
    if not isinstance(per_example, torch.Tensor) or per_example.shape != (batch_size,):
        shape = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else None
        raise ValueError(
            f"{name}.training_step returned {PER_EXAMPLE_LOSS_KEY!r} of shape {shape}, "
            f"expected ({batch_size},): one loss per example of the batch."
        )
    loss = output["loss"]
    mean = per_example.detach().mean()
    if batch_size and not torch.allclose(loss.detach(), mean, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{name}.training_step returned loss {loss.item():.6g}, but the mean of "
            f"{PER_EXAMPLE_LOSS_KEY!r} is {mean.item():.6g}. Ghost clipping trains on the "
            "per-example losses only, so any other term of the loss (a regularizer, say) "
            "would be dropped. Put an L2 penalty into the optimizer's weight_decay instead, "
            "or use grad_sample_mode 'ew'."
        )
    return per_example
