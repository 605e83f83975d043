"""A small classifier and datamodule on scikit-learn's iris data, for testing the zoo's plumbing."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zoo.datamodules.sampling import seeded_loader


class IrisClassifier(pl.LightningModule):
    """A one-hidden-layer classifier of the four iris features.

    Args:
        hidden: hidden width.
        lr: SGD learning rate.
        crash_at_step: raise ``RuntimeError`` when this global step is reached, to test
            resuming; ``-1`` never crashes.
    """

    def __init__(
        self, hidden: int = 16, lr: float = 0.1, num_classes: int = 3, crash_at_step: int = -1
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        if self.global_step == self.hparams.crash_at_step:
            raise RuntimeError(f"crash requested at step {self.global_step}")
        x, y = batch
        # Dropout-like noise makes the result depend on the restored RNG state.
        x = x + 0.01 * torch.randn_like(x)
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(dim=1) == y).float().mean()
        self.log("val_acc", accuracy, sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(dim=1) == y).float().mean(), sync_dist=True)

    def predict_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class IrisDataModule(pl.LightningDataModule):
    """Iris features standardised, split 100/50 with a fixed permutation."""

    def __init__(self, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_iris

        features, labels = load_iris(return_X_y=True)
        x = torch.tensor(features, dtype=torch.float32)
        x = (x - x.mean(0)) / x.std(0)
        y = torch.tensor(labels)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        self.train_set = TensorDataset(x[order[:100]], y[order[:100]])
        self.val_set = TensorDataset(x[order[100:]], y[order[100:]])

    def train_dataloader(self) -> DataLoader:
        return seeded_loader(self.train_set, batch_size=self.batch_size, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=50)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
