"""Bilevel tuning of per-feature L2 regularization for logistic regression.

The outer problem minimizes the validation loss of the logistic regression whose weights
solve the inner, regularized training problem (see :mod:`zoo.optlayers.logistic`). The
hyperparameters are the log-regularization strengths, one per feature. Their gradient (the
hypergradient) comes from implicit differentiation of the inner solution by default, or
from backpropagation through unrolled gradient descent for comparison.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from zoo.optlayers.logistic import (
    add_intercept,
    fit_gradient_descent,
    fit_newton,
    solve_implicit,
)

logger = logging.getLogger(__name__)

HYPERGRADIENTS = ("implicit", "unrolled")


class BilevelLogisticRegression(pl.LightningModule):
    """Learns one L2 regularization strength per feature on validation data.

    Batches are dicts with the inner training set (``inner_features``, ``inner_labels``) and a
    mini-batch of outer validation rows (``outer_features``, ``outer_labels``), as produced by
    :class:`zoo.datamodules.breast_cancer.BreastCancerBilevelDataModule`. Each training step
    solves the inner problem from scratch and takes an optimizer step on the hyperparameters.
    Validation and test fit the inner problem to optimality and report the outer loss and
    accuracy. The model computes in float64.

    Args:
        num_features: Number of input features (30 for breast cancer).
        init_log_reg: Initial natural-log regularization strength of every feature.
        lr: Adam learning rate of the log-regularization strengths.
        hypergradient: ``"implicit"`` (implicit differentiation) or ``"unrolled"``
            (backpropagation through ``inner_steps`` of gradient descent).
        inner_solver: ``"newton"`` or ``"gradient_descent"``, for the implicit mode.
        inner_steps: Iteration limit of the inner solver in training.
        inner_tol: Newton stopping tolerance and adjoint-solve tolerance.
        linear_solver: Adjoint linear solver for the implicit mode (``"cg"``, ``"dense"``, ...).
    """

    def __init__(
        self,
        num_features: int = 30,
        init_log_reg: float = 0.0,
        lr: float = 0.1,
        hypergradient: str = "implicit",
        inner_solver: str = "newton",
        inner_steps: int = 50,
        inner_tol: float = 1e-10,
        linear_solver: str = "cg",
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}.")
        if not math.isfinite(init_log_reg):
            raise ValueError(f"init_log_reg must be finite, got {init_log_reg}.")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if hypergradient not in HYPERGRADIENTS:
            raise ValueError(
                f"hypergradient must be one of {HYPERGRADIENTS}, got {hypergradient!r}."
            )
        if inner_solver not in ("newton", "gradient_descent"):
            raise ValueError(
                f"inner_solver must be 'newton' or 'gradient_descent', got {inner_solver!r}."
            )
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be at least 1, got {inner_steps}.")
        if not inner_tol > 0:
            raise ValueError(f"inner_tol must be positive, got {inner_tol}.")
        self.save_hyperparameters()
        self.log_reg = torch.nn.Parameter(
            torch.full((num_features,), float(init_log_reg), dtype=torch.float64)
        )

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        for key in ("inner_features", "inner_labels", "outer_features", "outer_labels"):
            if key not in batch:
                raise KeyError(f"Batch is missing {key!r}; use BreastCancerBilevelDataModule.")
        width = batch["inner_features"].shape[-1]
        if width != self.hparams.num_features:
            raise ValueError(
                f"Batch has {width} features but the model was built with "
                f"num_features={self.hparams.num_features}."
            )

    def inner_weights(
        self, features: torch.Tensor, labels: torch.Tensor, differentiable: bool = True
    ) -> torch.Tensor:
        """Fit the inner logistic regression; the result depends on ``log_reg`` if asked."""
        design = add_intercept(features.to(torch.float64))
        labels = labels.to(torch.float64)
        hp = self.hparams
        if not differentiable:
            with torch.no_grad():
                return fit_newton(self.log_reg, design, labels, maxiter=100, tol=hp.inner_tol)
        if hp.hypergradient == "unrolled":
            return fit_gradient_descent(self.log_reg, design, labels, hp.inner_steps)
        return solve_implicit(
            self.log_reg,
            design,
            labels,
            inner_solver=hp.inner_solver,
            num_steps=hp.inner_steps,
            linear_solver=hp.linear_solver,
            tol=hp.inner_tol,
        )

    def forward(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Return logits of ``features`` under inner ``weights`` (intercept last)."""
        return add_intercept(features.to(torch.float64)) @ weights

    def _outer_metrics(self, batch: dict[str, torch.Tensor], weights: torch.Tensor):
        logits = self(batch["outer_features"], weights)
        labels = batch["outer_labels"].to(torch.float64)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        accuracy = ((logits > 0).to(torch.float64) == labels).to(torch.float64).mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._check_batch(batch)
        weights = self.inner_weights(batch["inner_features"], batch["inner_labels"])
        loss, accuracy = self._outer_metrics(batch, weights)
        self.log("train/outer_loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/outer_accuracy", accuracy, sync_dist=True)
        self.log("train/mean_log_reg", self.log_reg.detach().mean(), sync_dist=True)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        self._check_batch(batch)
        weights = self.inner_weights(
            batch["inner_features"], batch["inner_labels"], differentiable=False
        )
        loss, accuracy = self._outer_metrics(batch, weights)
        size = batch["outer_labels"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=size)
        self.log(f"{stage}/accuracy", accuracy, sync_dist=True, batch_size=size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Return the probability of label 1 (benign) for each outer row of ``batch``.

        The inner regression is fit on the batch's inner set with the learned regularization.
        """
        self._check_batch(batch)
        weights = self.inner_weights(
            batch["inner_features"], batch["inner_labels"], differentiable=False
        )
        return torch.sigmoid(self(batch["outer_features"], weights))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@torch.no_grad()
def evaluate_split(
    module: BilevelLogisticRegression,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    split: str = "test",
) -> dict[str, float]:
    """Fit the inner problem on ``splits["inner"]`` and score it on ``splits[split]``.

    ``splits`` is :attr:`BreastCancerBilevelDataModule.splits` after ``setup()``.

    Returns:
        ``{"loss": mean logistic loss, "accuracy": fraction correct}``.
    """
    if split not in splits or "inner" not in splits:
        raise KeyError(f"splits must contain 'inner' and {split!r}; got {sorted(splits)}.")
    weights = module.inner_weights(*splits["inner"], differentiable=False)
    features, labels = splits[split]
    batch = {
        "outer_features": features,
        "outer_labels": labels,
    }
    loss, accuracy = module._outer_metrics(batch, weights)
    return {"loss": loss.item(), "accuracy": accuracy.item()}
