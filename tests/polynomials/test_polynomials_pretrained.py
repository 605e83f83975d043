"""The shipped poly-d16-k2-q3 checkpoint reproduces its manifest metric."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.hub import import_class, load_config, read_manifest


def test_pretrained_reproduces_test_nmse() -> None:
    model = zoo.load_pretrained("poly-d16-k2-q3").eval()
    manifest = read_manifest("poly-d16-k2-q3")
    data_section = load_config(manifest["model"])["data"]
    data = import_class(data_section["class_path"])(**data_section["init_args"])
    data.setup("test")
    assert data.test_set is not None
    with torch.no_grad():
        prediction = model(data.test_set.x).double()
    target = data.test_set.y.double()
    nmse = float(((prediction - target) ** 2).mean() / target.var(unbiased=False))
    # Same weights and the same seeded test set: only summation order can differ.
    assert nmse == pytest.approx(manifest["metric"]["value"], abs=1e-3)
    assert nmse < 0.3
    assert int(model.completed_stages) == 3


def test_create_model_builds_each_config() -> None:
    for name in zoo.list_models("poly-*"):
        model = zoo.create_model(name)
        assert model.hparams["input_dim"] in (8, 16), name
