"""`Trainer.predict`, which `zoo predict` runs, on every shipped optlayers checkpoint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import zoo
from zoo.datamodules.breast_cancer import BreastCancerBilevelDataModule
from zoo.datamodules.digits import DigitsDataModule


def _predict(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> torch.Tensor:
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return torch.cat(trainer.predict(module, datamodule=datamodule))


@pytest.mark.parametrize("name", ["opt-qpnet-digits", "opt-distill-digits"])
def test_digits_predictions_reach_manifest_accuracy(name):
    module = zoo.load_pretrained(name)
    datamodule = DigitsDataModule(**zoo.hub.load_config(name)["data"]["init_args"])
    predictions = _predict(module, datamodule)
    labels = datamodule.test_set.tensors[1]
    assert predictions.shape == labels.shape
    accuracy = (predictions == labels).double().mean().item()
    assert accuracy == pytest.approx(module.zoo_pretrained["metric"]["value"], abs=1e-6)


def test_bilevel_predictions_reach_manifest_accuracy():
    name = "opt-bilevel-breast-cancer"
    module = zoo.load_pretrained(name)
    datamodule = BreastCancerBilevelDataModule(**zoo.hub.load_config(name)["data"]["init_args"])
    probabilities = _predict(module, datamodule)
    labels = datamodule.splits["test"][1]
    assert probabilities.shape == labels.shape
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    accuracy = ((probabilities > 0.5).double() == labels).double().mean().item()
    assert accuracy == pytest.approx(module.zoo_pretrained["extra"]["test_accuracy"], abs=1e-12)
