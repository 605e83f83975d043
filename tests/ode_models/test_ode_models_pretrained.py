"""The shipped ERNODE MNIST checkpoint loads and reproduces its manifest metric."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from zoo.datamodules.mnist import MNISTDataModule
from zoo.hub import read_manifest
from zoo.ode.classifier import ODEClassifier

NAME = "ode-mnist-ernode"


def test_pretrained_mnist_ernode_reproduces_manifest(shared_data: Path) -> None:
    manifest = read_manifest(NAME)
    model = zoo.load_pretrained(NAME)
    assert isinstance(model, ODEClassifier)
    assert model.hparams.regularizer == "ernode"
    data = MNISTDataModule(data_dir=str(shared_data), download=False, batch_size=128)
    data.setup("test")
    model.eval()
    correct = 0
    nfe = []
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            correct += int((model(images).argmax(dim=-1) == labels).sum())
            nfe.append(model.ode_stats["nfe"])
    accuracy = correct / len(data.test_set)
    assert manifest["metric"]["name"] == "test_accuracy"
    # Per-sample step sizes make each prediction independent of the batch size, so only
    # floating-point rounding can move the accuracy.
    assert accuracy == pytest.approx(manifest["metric"]["value"], abs=0.002)
    # Same batches of 128 as at export, so the mean NFE per batch matches too.
    assert sum(nfe) / len(nfe) == pytest.approx(manifest["extra"]["test_nfe"], rel=0.05)
