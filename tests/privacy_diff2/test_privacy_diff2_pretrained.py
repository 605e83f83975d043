"""Tests of the shipped private ``diff2-adult`` checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from zoo import hub
from zoo.datamodules.adult import AdultDataModule
from zoo.privacy.diff2_accounting import diff2_epsilon


def test_manifest_records_privacy() -> None:
    manifest = hub.read_manifest("diff2-adult")
    privacy = manifest["extra"]["privacy"]
    assert privacy["delta"] == 1e-5
    assert 0 < privacy["epsilon"] <= 1.0
    recomputed = diff2_epsilon(
        privacy["rounds"],
        privacy["restart_interval"],
        privacy["noise_multiplier_restart"],
        privacy["noise_multiplier_difference"],
        privacy["delta"],
    )
    assert privacy["epsilon"] == pytest.approx(recomputed, rel=1e-9)
    assert manifest["config"]["init_args"]["noise_seed"] is None


def test_pretrained_reproduces_test_accuracy(shared_data: Path) -> None:
    manifest = hub.read_manifest("diff2-adult")
    model = zoo.load_pretrained("diff2-adult")
    data = AdultDataModule(data_dir=str(shared_data), batch_size=-1, val_fraction=0.1, seed=0)
    data.setup("test")
    inputs, labels = data.test_set.tensors
    model.eval()
    with torch.no_grad():
        accuracy = ((model(inputs) > 0).long() == labels).double().mean().item()
    assert accuracy == pytest.approx(manifest["metric"]["value"], abs=1e-4)
    majority = 1.0 - labels.double().mean().item()
    assert accuracy > majority + 0.03, "the private model must beat the majority class"
