"""Dataset distillation with an inner problem solved to optimality and differentiated implicitly.

A few synthetic images (``images_per_class`` per class) are learned so that an L2-regularized
multinomial logistic regression trained on them alone classifies real images well. Each
training step fits that regression on the synthetic images to optimality by Newton's method,
without a graph. It then backpropagates the cross-entropy on a batch of real images to the
synthetic images through the stationarity condition of the regression: implicit
differentiation, with CG on Hessian-vector products for the adjoint solve. The setup follows the dataset-distillation experiment of Blondel
et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022, on 8 x 8 digits
instead of MNIST.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from zoo.optlayers.conditions import stationarity
from zoo.optlayers.implicit import implicit_root
from zoo.optlayers.softmax_regression import (
    add_bias_column,
    fit_softmax_regression,
    softmax_regression_objective,
)

logger = logging.getLogger(__name__)


class DatasetDistillation(pl.LightningModule):
    """Learns synthetic training images for a multinomial logistic regression.

    Batches are ``(images, labels)`` of real data, as from
    :class:`zoo.datamodules.digits.DigitsDataModule`. Validation and test report the accuracy
    of the regression trained on the synthetic images only. The model computes in float64.

    Args:
        image_shape: Shape of one image, e.g. ``[1, 8, 8]``.
        num_classes: Number of classes.
        images_per_class: Synthetic images per class.
        l2_reg: L2 strength of the inner regression (its Hessian's smallest eigenvalue).
        lr: Adam learning rate of the synthetic images.
        init_scale: Standard deviation of the initial synthetic images.
        inner_maxiter: Newton iteration limit of the inner fit.
        inner_tol: Newton stopping tolerance on the gradient's max-norm.
        linear_solver: Adjoint solver (``"cg"``: the Hessian is symmetric positive definite).
        adjoint_tol: Relative tolerance of the adjoint solve.
    """

    def __init__(
        self,
        image_shape: list[int] | None = None,
        num_classes: int = 10,
        images_per_class: int = 1,
        l2_reg: float = 0.01,
        lr: float = 0.05,
        init_scale: float = 0.1,
        inner_maxiter: int = 30,
        inner_tol: float = 1e-9,
        linear_solver: str = "cg",
        adjoint_tol: float = 1e-8,
    ) -> None:
        super().__init__()
        image_shape = [1, 8, 8] if image_shape is None else list(image_shape)
        if not image_shape or any(int(size) < 1 for size in image_shape):
            raise ValueError(f"image_shape must list positive sizes, got {image_shape}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        if images_per_class < 1:
            raise ValueError(f"images_per_class must be at least 1, got {images_per_class}.")
        for name, value in (
            ("l2_reg", l2_reg),
            ("lr", lr),
            ("init_scale", init_scale),
            ("inner_tol", inner_tol),
            ("adjoint_tol", adjoint_tol),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        if inner_maxiter < 1:
            raise ValueError(f"inner_maxiter must be at least 1, got {inner_maxiter}.")
        self.save_hyperparameters()
        self.hparams.image_shape = image_shape
        count = num_classes * images_per_class
        width = math.prod(image_shape)
        self.distilled = nn.Parameter(init_scale * torch.randn(count, width, dtype=torch.float64))
        labels = torch.arange(num_classes).repeat_interleave(images_per_class)
        self.register_buffer("distilled_labels", labels, persistent=False)
        self._warm_start: torch.Tensor | None = None

    def distilled_images(self) -> torch.Tensor:
        """Return the synthetic images shaped ``(count, *image_shape)``."""
        return self.distilled.detach().reshape(-1, *self.hparams.image_shape)

    def classifier_weights(self, differentiable: bool = True) -> torch.Tensor:
        """Fit the regression on the synthetic images; returns weights ``(d + 1, classes)``."""
        hp = self.hparams
        labels = self.distilled_labels

        def objective(weights: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            return softmax_regression_objective(weights, images, labels, hp.l2_reg)

        def solve(init: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
            return fit_softmax_regression(
                images, labels, hp.num_classes, hp.l2_reg, init, hp.inner_maxiter, hp.inner_tol
            )

        init = self._warm_start
        if init is None or init.shape[0] != self.distilled.shape[1] + 1:
            init = torch.zeros(
                self.distilled.shape[1] + 1, hp.num_classes, dtype=torch.float64, device=self.device
            )
        if differentiable:
            solver = implicit_root(
                stationarity(objective), solve=hp.linear_solver, tol=hp.adjoint_tol
            )(solve)
            weights = solver(init, self.distilled)
        else:
            weights = solve(init, self.distilled.detach())
        self._warm_start = weights.detach()
        return weights

    def forward(self, images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits of real ``images`` under the regression fit on the synthetic images."""
        if weights is None:
            with torch.no_grad():
                weights = self.classifier_weights(differentiable=False)
        flat = images.flatten(1).to(torch.float64)
        if flat.shape[1] != self.distilled.shape[1]:
            raise ValueError(
                f"Images have {flat.shape[1]} values each, expected {self.distilled.shape[1]} "
                f"(image_shape={self.hparams.image_shape})."
            )
        return add_bias_column(flat) @ weights

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, labels = batch
        logits = self(images, self.classifier_weights())
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).double().mean()
        size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log("train/accuracy", accuracy, sync_dist=True, batch_size=size)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        size = labels.shape[0]
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).double().mean()
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=size)
        self.log(f"{stage}/accuracy", accuracy, prog_bar=True, sync_dist=True, batch_size=size)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Return the predicted class of each real image; labels in the batch are ignored."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(dim=-1)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        from zoo.callbacks.figures import log_figure

        log_figure(self.trainer, "distilled_images", distilled_image_grid(self))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def distilled_image_grid(module: DatasetDistillation, columns: int | None = None):
    """Return a matplotlib figure showing every synthetic image with its class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = module.distilled_images().cpu()
    labels = module.distilled_labels.cpu().tolist()
    count = images.shape[0]
    columns = columns or min(count, 10)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.3 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            picture = images[index]
            picture = picture[0] if picture.dim() == 3 and picture.shape[0] == 1 else picture
            axis.imshow(picture.numpy(), cmap="gray")
            axis.set_title(str(labels[index]), fontsize=9)
    figure.tight_layout()
    return figure


@torch.no_grad()
def accuracy_of_training_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    l2_reg: float,
) -> float:
    """Train the regression on ``images`` and return its accuracy on the test images."""
    features = images.flatten(1).to(torch.float64)
    weights = fit_softmax_regression(features, labels, num_classes, l2_reg)
    logits = add_bias_column(test_images.flatten(1).to(torch.float64)) @ weights
    return (logits.argmax(-1) == test_labels).double().mean().item()
