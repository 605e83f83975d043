"""A plain classifier LightningModule: the model that the DP-SGD configs train privately.

Nothing here is private by itself. Privacy comes from adding the ``DPSGD`` callback, which
works on any LightningModule; this module is only the small network it is shown on.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from zoo.privacy.networks import build_network

logger = logging.getLogger(__name__)

#: Optimizers by name.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


class Classifier(pl.LightningModule):
    """Classify with a network chosen by name, trained with cross-entropy.

    Logs ``train/loss`` per step and ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``
    per epoch.

    Args:
        network: Name of a network in ``zoo.privacy.networks.NETWORKS``.
        network_kwargs: Keyword arguments of that network's builder.
        num_classes: Number of classes (passed to the network builder too).
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: Learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty of the optimizer.
    """

    def __init__(
        self,
        network: str = "mnist_cnn",
        network_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        optimizer: str = "sgd",
        lr: float = 0.5,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"Unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(
                f"momentum and weight_decay must be >= 0, got {momentum} and {weight_decay}."
            )
        self.save_hyperparameters()
        self.net = build_network(network, num_classes=num_classes, **(network_kwargs or {}))
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits ``[B, num_classes]``."""
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        """Return the mean loss and, for DP-SGD's ghost clipping, each example's loss."""
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        loss = losses.mean()
        # Rank zero's loss only: synchronising it would add a collective to every step.
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(y))
        return {"loss": loss, "per_example_loss": losses}

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, accuracy: MulticlassAccuracy
    ) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        accuracy(logits, y)
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", accuracy, on_epoch=True, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hparams = self.hparams
        kwargs: dict[str, Any] = {"lr": hparams.lr, "weight_decay": hparams.weight_decay}
        if hparams.optimizer == "sgd":
            kwargs["momentum"] = hparams.momentum
        return OPTIMIZERS[hparams.optimizer](self.parameters(), **kwargs)
