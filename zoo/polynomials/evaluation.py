"""Evaluation shared by the polynomial regression LightningModules."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanSquaredError, R2Score

__all__ = ["PolynomialRegressionModule"]

Batch = dict[str, torch.Tensor]


class PolynomialRegressionModule(pl.LightningModule):
    """Base class: validation and test metrics for regression on ``{"x", "y", "p"}`` batches.

    Subclasses set ``self.net`` (an ``nn.Module`` mapping ``(n, d)`` to ``(n,)``) and
    implement training. Logged per split (``val`` or ``test``): ``mse`` and ``nmse``, the
    mean squared error divided by the sample variance of the targets (``1 - R^2``), so an
    ``nmse`` of 1 is the error of predicting the mean.
    """

    net: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.val_mse = MeanSquaredError()
        self.val_r2 = R2Score()
        self.test_mse = MeanSquaredError()
        self.test_r2 = R2Score()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the predictions ``f(x)`` for a batch ``(n, d)``, shape ``(n,)``."""
        return self.net(x)

    def _update_metrics(self, batch: Batch, split: str) -> None:
        prediction = self(batch["x"])
        getattr(self, f"{split}_mse").update(prediction, batch["y"])
        getattr(self, f"{split}_r2").update(prediction, batch["y"])

    def _log_metrics(self, split: str) -> None:
        mse = getattr(self, f"{split}_mse")
        r2 = getattr(self, f"{split}_r2")
        # Metric.compute() already reduces over DDP ranks, so every rank logs the same
        # value and the mean that sync_dist takes leaves it unchanged.
        self.log(f"{split}/mse", mse.compute(), sync_dist=True)
        self.log(f"{split}/nmse", 1.0 - r2.compute(), sync_dist=True)
        mse.reset()
        r2.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update_metrics(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._update_metrics(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> Any:
        return self(batch["x"])
