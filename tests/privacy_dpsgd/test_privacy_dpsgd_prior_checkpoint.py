"""DPSGD callback: a module loaded from a private .ckpt keeps counting epsilon."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import quiet_trainer
from zoo.privacy import accounting
from zoo.privacy.dpsgd import DPSGD


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(model: pl.LightningModule, dpsgd: DPSGD) -> pl.Trainer:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=generator), torch.randint(0, 2, (64,)))
    trainer = quiet_trainer([dpsgd], max_epochs=1)
    trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=16))
    return trainer


def test_prior_checkpoint_continues_accountant(tmp_path: Path) -> None:
    first = DPSGD(noise_multiplier=1.0, accountant="rdp", seed=0)
    trainer = _fit(_Linear(), first)
    path = str(tmp_path / "first.ckpt")
    trainer.save_checkpoint(path)

    model = _Linear.load_from_checkpoint(path)
    second = DPSGD(noise_multiplier=1.0, accountant="rdp", seed=1, prior_checkpoint=path)
    _fit(model, second)

    assert second.history == [(1.0, 0.25, 4), (1.0, 0.25, 4)]
    expected = accounting.epsilon_of(((1.0, 0.25, 8),), 1e-5, "rdp")
    assert second.epsilon() == pytest.approx(expected)
    assert second.epsilon() > first.epsilon()


def test_prior_checkpoint_without_privacy_rejected(tmp_path: Path) -> None:
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="no 'privacy' entry"):
        _fit(_Linear(), DPSGD(noise_multiplier=1.0, prior_checkpoint=str(path)))


def test_prior_checkpoint_missing_file_rejected(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.ckpt")
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        _fit(_Linear(), DPSGD(noise_multiplier=1.0, prior_checkpoint=path))
