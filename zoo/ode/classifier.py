"""Neural-ODE image classifier with solver-heuristic regularization.

The layout follows the MNIST neural ODE of Pal, Ma, Shah and Rackauckas, "Opening the
Blackbox" (ICML 2021). A downsampling map turns the image into a flat state, a neural ODE
with a time-dependent tanh MLP as vector field runs on ``t in [0, end_time]``, and a linear
head classifies the final state.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.ode.block import RegularizedODEBlock
from zoo.ode.regularizers import (
    REGULARIZER_NAMES,
    annealed_weight,
    build_regularizer,
    resolve_anneal_epochs,
)
from zoo.ode.stats import solve_statistics
from zoo.ode.vector_fields import TimeConcatMLP

logger = logging.getLogger(__name__)

DOWNSAMPLE_CHOICES = ("flatten", "avgpool", "linear")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; use an integer >= 1.")


def _check_positive_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} is invalid; use a number > 0.")


def build_downsampler(
    kind: str, image_shape: tuple[int, int, int], state_size: int, pool_factor: int
) -> tuple[nn.Module, int]:
    """Build the map from images ``[B, C, H, W]`` to flat states and return its output size.

    Args:
        kind: ``"flatten"`` (all pixels), ``"avgpool"`` (average-pool by ``pool_factor``,
            then flatten) or ``"linear"`` (flatten, then a learned linear map to
            ``state_size``).
        image_shape: ``(C, H, W)`` of the input images.
        state_size: Output size for ``"linear"``; ignored otherwise.
        pool_factor: Pooling window and stride for ``"avgpool"``.
    """
    channels, height, width = image_shape
    if kind == "flatten":
        return nn.Flatten(), channels * height * width
    if kind == "avgpool":
        if height % pool_factor or width % pool_factor:
            raise ValueError(
                f"pool_factor={pool_factor} does not divide the image size {height}x{width}; "
                "choose a divisor of both."
            )
        pooled = channels * (height // pool_factor) * (width // pool_factor)
        return nn.Sequential(nn.AvgPool2d(pool_factor), nn.Flatten()), pooled
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, state_size)), (
            state_size
        )
    raise ValueError(
        f"downsample={kind!r} is not supported; use one of {list(DOWNSAMPLE_CHOICES)}."
    )


class ODEClassifier(pl.LightningModule):
    """Image classifier whose hidden layer is a neural ODE, with an optional regularizer.

    The training loss is ``cross_entropy + lambda(epoch) * R``, where ``R`` is the penalty of
    the chosen regularizer and ``lambda`` decays exponentially from ``reg_weight`` to
    ``reg_weight_final`` over ``reg_anneal_epochs`` (see
    :func:`zoo.ode.regularizers.annealed_weight`). Solver statistics (NFE, accepted and
    rejected steps, penalty terms) of the latest batch are kept in :attr:`ode_stats` and
    logged per epoch by :class:`zoo.callbacks.ode_stats.ODEStatsCallback`.

    Args:
        image_shape: ``[channels, height, width]`` of the input images; ``None`` means
            ``[1, 28, 28]`` (MNIST).
        num_classes: Number of classes.
        downsample: ``"flatten"``, ``"avgpool"`` or ``"linear"``; see :func:`build_downsampler`.
        state_size: State size of the ODE for ``downsample="linear"``.
        pool_factor: Pooling factor for ``downsample="avgpool"``.
        hidden_size: Hidden width of the vector field.
        end_time: The ODE is solved on ``[0, end_time]``.
        regularizer: ``"none"``, ``"ernode"``, ``"srnode"``, ``"ernode+srnode"`` or ``"rnode"``.
        regularizer_kwargs: Constructor arguments of the regularizer, for example
            ``{"reduction": "sum"}``.
        reg_weight: Regularization weight at epoch 0 (``lambda0``).
        reg_weight_final: Weight reached after ``reg_anneal_epochs`` epochs (``lambda1``);
            ``None`` keeps ``reg_weight`` constant.
        reg_anneal_epochs: Length of the decay in epochs; ``None`` uses ``trainer.max_epochs``.
        method: Solver method, ``"tsit5"`` or ``"dopri5"``.
        rtol: Relative tolerance of the solver.
        atol: Absolute tolerance of the solver.
        max_steps: Maximum number of solver steps per solve.
        per_sample_steps: Give each image its own step sizes.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        log_ode_stats: Attach :class:`zoo.callbacks.ode_stats.ODEStatsCallback`.
    """

    def __init__(
        self,
        image_shape: list[int] | None = None,
        num_classes: int = 10,
        downsample: str = "linear",
        state_size: int = 32,
        pool_factor: int = 2,
        hidden_size: int = 100,
        end_time: float = 1.0,
        regularizer: str = "none",
        regularizer_kwargs: dict[str, Any] | None = None,
        reg_weight: float = 0.0,
        reg_weight_final: float | None = None,
        reg_anneal_epochs: int | None = None,
        method: str = "tsit5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        max_steps: int = 10_000,
        per_sample_steps: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        log_ode_stats: bool = True,
    ) -> None:
        super().__init__()
        if image_shape is None:
            image_shape = [1, 28, 28]
        if len(image_shape) != 3:
            raise ValueError(
                f"image_shape={list(image_shape)} is invalid; give [channels, height, width]."
            )
        for index, size in enumerate(image_shape):
            _check_positive_int(f"image_shape[{index}]", size)
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("state_size", state_size)
        _check_positive_int("pool_factor", pool_factor)
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_float("end_time", end_time)
        _check_positive_float("lr", lr)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
            raise TypeError(f"weight_decay must be a number, got {weight_decay!r}.")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} is invalid; use a number >= 0.")
        if regularizer not in REGULARIZER_NAMES:
            raise ValueError(
                f"regularizer={regularizer!r} is not supported; use one of "
                f"{list(REGULARIZER_NAMES)}."
            )
        if reg_anneal_epochs is not None:
            _check_positive_int("reg_anneal_epochs", reg_anneal_epochs)
        # Validate the weights now rather than at the first epoch.
        annealed_weight(0, reg_weight, reg_weight_final, reg_anneal_epochs or 1)
        self.save_hyperparameters()
        self.hparams.image_shape = [int(size) for size in image_shape]

        shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
        self.downsampler, ode_size = build_downsampler(downsample, shape, state_size, pool_factor)
        self.ode = RegularizedODEBlock(
            TimeConcatMLP(ode_size, hidden_size),
            build_regularizer(regularizer, **(regularizer_kwargs or {})),
            method=method,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            per_sample_steps=per_sample_steps,
        )
        self.head = nn.Linear(ode_size, num_classes)
        self.register_buffer("times", torch.tensor([0.0, float(end_time)]), persistent=False)
        self.train_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.ode_stats: dict[str, float] = {}

    def _check_images(self, images: Tensor) -> None:
        expected = tuple(self.hparams.image_shape)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Expected images of shape [batch, {', '.join(map(str, expected))}], got "
                f"{tuple(images.shape)}; set image_shape to match the datamodule."
            )

    def forward_with_penalty(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Return logits, the regularization penalty and the solve statistics."""
        self._check_images(images)
        state = self.downsampler(images)
        output = self.ode(state, self.times.to(state.dtype))
        logits = self.head(output.ys[-1])
        return logits, output.penalty, solve_statistics(output)

    def forward(self, images: Tensor) -> Tensor:
        """Return class logits ``[batch, num_classes]`` for images ``[batch, C, H, W]``."""
        logits, _, stats = self.forward_with_penalty(images)
        self.ode_stats = stats
        return logits

    def current_reg_weight(self) -> float:
        """Return the regularization weight of the current epoch."""
        hparams = self.hparams
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        total = resolve_anneal_epochs(
            hparams.reg_anneal_epochs, hparams.reg_weight_final, max_epochs
        )
        epoch = self.current_epoch if self._trainer is not None else 0
        return annealed_weight(epoch, hparams.reg_weight, hparams.reg_weight_final, total)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits, penalty, stats = self.forward_with_penalty(images)
        task_loss = nn.functional.cross_entropy(logits, labels)
        weight = self.current_reg_weight()
        loss = task_loss + weight * penalty
        stats["reg_weight"] = weight
        self.ode_stats = stats
        self.train_accuracy(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/task_loss", task_loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy):
        images, labels = batch
        logits, _, stats = self.forward_with_penalty(images)
        self.ode_stats = stats
        metric(logits, labels)
        loss = nn.functional.cross_entropy(logits, labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )

    def configure_callbacks(self) -> list[pl.Callback]:
        if not self.hparams.log_ode_stats:
            return []
        from zoo.callbacks.ode_stats import ODEStatsCallback

        return [ODEStatsCallback()]
