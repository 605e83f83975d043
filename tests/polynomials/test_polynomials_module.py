"""Tests of the LightningModules: input checks, equivalence with the in-memory fit, CLI runs."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import REPO_ROOT, run_zoo

from zoo.datamodules.polynomials import HierarchicalPolynomialDataModule
from zoo.hub import create_model, load_config
from zoo.polynomials import LayerwiseThreeLayer, RandomFeatureRidge
from zoo.polynomials.layerwise import fit_layerwise
from zoo.polynomials.networks import ThreeLayerNetwork


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two intra-op threads on a shared 2-core machine are many times slower than one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _small_data(**overrides: object) -> HierarchicalPolynomialDataModule:
    settings = {
        "input_dim": 8,
        "num_feature_samples": 1536,
        "num_link_samples": 512,
        "num_val_samples": 512,
        "num_test_samples": 512,
        "batch_size": 256,
        "seed": 0,
    }
    settings.update(overrides)
    return HierarchicalPolynomialDataModule(**settings)  # type: ignore[arg-type]


def _trainer(max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def test_feature_width_below_monomial_count_rejected() -> None:
    with pytest.raises(ValueError, match="smaller than the 136 monomials"):
        LayerwiseThreeLayer(input_dim=16, feature_degree=2, feature_width=100)


@pytest.mark.parametrize(("activation", "degree"), [("relu", 3), ("tanh", 2), ("hermite2", 3)])
def test_activation_without_degree_k_rejected(activation: str, degree: int) -> None:
    with pytest.raises(ValueError, match=f"degree-{degree} Hermite coefficient"):
        LayerwiseThreeLayer(
            input_dim=8, feature_degree=degree, feature_width=512, feature_activation=activation
        )


def test_activation_with_low_degree_warns() -> None:
    with pytest.warns(UserWarning, match="degree-1 Hermite coefficient"):
        LayerwiseThreeLayer(input_dim=8, feature_degree=2, feature_activation="softplus")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_width": 1}, "hidden_width"),
        ({"feature_scale": 0.0}, "feature_scale"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"ridges": []}, "ridges"),
        ({"ridges": [1e-3, float("nan")]}, "finite values"),
        ({"ridges": [float("inf")]}, "finite values"),
        ({"activation": "swish"}, "Unknown activation"),
    ],
)
def test_bad_hyperparameters_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LayerwiseThreeLayer(input_dim=8, feature_width=512, **kwargs)


def test_too_few_epochs_rejected() -> None:
    model = LayerwiseThreeLayer(input_dim=8, feature_width=512, hidden_width=8)
    with pytest.raises(ValueError, match="max_epochs=2 is too small"):
        _trainer(max_epochs=2).fit(model, _small_data())


def test_mismatched_input_dim_rejected() -> None:
    model = LayerwiseThreeLayer(input_dim=10, feature_width=512, hidden_width=8)
    with pytest.raises(ValueError, match="model.input_dim=10 does not match data.input_dim=8"):
        _trainer(max_epochs=3).fit(model, _small_data())


def test_lightning_stages_match_in_memory_fit() -> None:
    data = _small_data()
    model = LayerwiseThreeLayer(input_dim=8, feature_width=512, hidden_width=16, seed=4)
    trainer = _trainer(max_epochs=10)
    trainer.fit(model, data)
    assert int(model.completed_stages) == 3
    assert trainer.current_epoch == 3  # stopped itself after the link fit

    assert data.train_set is not None and data.val_set is not None
    part = data.train_set.part
    reference = ThreeLayerNetwork(8, 512, 16, "hermite2", "relu", seed=4)
    fit_layerwise(
        reference,
        (data.train_set.x[part == 0], data.train_set.y[part == 0]),
        (data.train_set.x[part == 1], data.train_set.y[part == 1]),
        seed=4 + 2,
    )
    with torch.no_grad():
        expected = reference(data.val_set.x)
        actual = model(data.val_set.x)
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3)
    assert float(trainer.callback_metrics["val/feature_corr"]) > 0.5


def test_reset_to_stage_refits_only_link() -> None:
    model = LayerwiseThreeLayer(input_dim=8, feature_width=512, hidden_width=16)
    _trainer(max_epochs=3).fit(model, _small_data())
    weight = model.net.weight.detach().clone()
    outer_weight = model.net.outer_weight.detach().clone()

    model.reset_to_stage(2)
    assert int(model.completed_stages) == 2
    _trainer(max_epochs=1).fit(model, _small_data(sample_seed=1))
    assert int(model.completed_stages) == 3
    assert torch.equal(model.net.weight, weight)
    assert not torch.equal(model.net.outer_weight, outer_weight)

    model.reset_to_stage(0)
    assert int(model.completed_stages) == 0
    assert not model.net.weight.any()


def test_random_feature_ridge_fits_in_one_epoch() -> None:
    # A quadratic target (g = identity) is within reach of a kernel method at this n.
    data = _small_data(link_coefficients=[0.0, 1.0])
    model = RandomFeatureRidge(input_dim=8, num_features=512)
    trainer = _trainer(max_epochs=5)
    trainer.fit(model, data)
    assert trainer.current_epoch == 1
    assert bool(model.fitted)
    assert float(trainer.callback_metrics["val/nmse"]) < 0.5


def _read_metrics(root: Path) -> list[dict[str, str]]:
    files = sorted(root.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {root}"
    with open(files[-1]) as handle:
        return list(csv.DictReader(handle))


def _last_value(rows: list[dict[str, str]], key: str) -> float:
    values = [float(row[key]) for row in rows if row.get(key)]
    assert values, f"{key} was never logged"
    return values[-1]


TINY_DATA = {
    "num_feature_samples": 2048,
    "num_link_samples": 1024,
    "num_val_samples": 512,
    "batch_size": 512,
}
TINY_MODEL = {"feature_width": 512}


def test_zoo_train_ddp_matches_single_process(tmp_path: Path) -> None:
    overrides = [f"--data.{key}={value}" for key, value in TINY_DATA.items()]
    overrides += [f"--model.{key}={value}" for key, value in TINY_MODEL.items()]
    run_zoo(
        [
            "train",
            "poly-d16-k2-q3",
            *overrides,
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=REPO_ROOT,
        timeout=300,
    )
    ddp_metrics = _read_metrics(tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert _last_value(ddp_metrics, "val/feature_corr") > 0.3

    # The same model and data in this process, on one device.
    data_section = load_config("poly-d16-k2-q3")["data"]
    data = HierarchicalPolynomialDataModule(**{**data_section["init_args"], **TINY_DATA})
    model = create_model("poly-d16-k2-q3", **TINY_MODEL)
    trainer = _trainer(max_epochs=3)
    trainer.fit(model, data)
    # Each stage sums over all samples before its update, so two processes give the same
    # model up to the samples that DistributedSampler repeats (none here: 3072 / 2).
    single_nmse = float(trainer.callback_metrics["val/nmse"])
    assert _last_value(ddp_metrics, "val/nmse") == pytest.approx(single_nmse, rel=1e-3)
