"""The shipped private checkpoint: accuracy, privacy manifest, and fine-tuning."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import zoo
from tests.helpers import REPO_ROOT, quiet_trainer, run_zoo
from zoo import hub
from zoo.datamodules.mnist import MNISTDataModule
from zoo.privacy import accounting
from zoo.privacy.dpsgd import DPSGD

NAME = "dp-mnist-eps3"


def test_dp_mnist_checkpoint_reproduces_accuracy(shared_data: Path) -> None:
    manifest = hub.read_manifest(NAME)
    model = zoo.load_pretrained(NAME)
    dm = MNISTDataModule(data_dir=str(shared_data), download=False, batch_size=2000)
    dm.setup("test")
    correct = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += (model(x).argmax(dim=1) == y).sum().item()
    accuracy = correct / len(dm.test_set)
    assert manifest["metric"]["name"] == "test_accuracy"
    # Same weights, same 10,000 images: only float summation order may differ.
    assert accuracy == pytest.approx(manifest["metric"]["value"], abs=1e-3)


def test_dp_mnist_manifest_epsilon_matches_accountant() -> None:
    privacy = hub.read_manifest(NAME)["extra"]["privacy"]
    assert privacy["delta"] == 1e-5
    assert 2.9 <= privacy["epsilon"] <= 3.0
    recomputed = accounting.epsilon_of(privacy["history"], privacy["delta"], privacy["accountant"])
    assert recomputed == pytest.approx(privacy["epsilon"], rel=1e-9)
    assert privacy["steps"] == accounting.total_steps(privacy["history"])


def test_zoo_list_shows_epsilon() -> None:
    process = run_zoo(["list", "dp-*"], cwd=REPO_ROOT, timeout=120)
    pretrained = process.stdout.split("Pretrained checkpoints")[1]
    line = next(line for line in pretrained.splitlines() if line.strip().startswith(NAME))
    assert "epsilon=" in line
    assert "delta=1.0e-05" in line


def test_dp_mnist_fine_tune_continues_accountant(shared_data: Path) -> None:
    pl.seed_everything(0)
    model = zoo.load_pretrained(NAME).train()
    prior = hub.read_manifest(NAME)["extra"]["privacy"]
    dm = MNISTDataModule(
        data_dir=str(shared_data), download=False, batch_size=100, subset=1000, val_size=1000
    )
    dpsgd = DPSGD(noise_multiplier=1.0, accountant=prior["accountant"])
    trainer = quiet_trainer([dpsgd], max_epochs=1, limit_val_batches=0)
    trainer.fit(model, dm)
    prior_history = accounting.normalise_history(prior["history"])
    assert dpsgd.history == [*prior_history, (1.0, 0.1, 10)]
    assert dpsgd.epsilon() > prior["epsilon"]
    assert dpsgd.privacy_state()["prior_source"] == NAME
