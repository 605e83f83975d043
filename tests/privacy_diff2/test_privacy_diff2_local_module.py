"""Tests of Diff2Classifier with subroutine="bvr-l-sgd": resumption, accounting, checks."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from test_privacy_diff2_module import make_trainer, small_adult
from torch.utils.data import DataLoader, TensorDataset

from zoo.datamodules.adult import AdultDataModule
from zoo.privacy.diff2 import simulate_diff2
from zoo.privacy.diff2_accounting import LocalStepsPrivacy, diff2_epsilon
from zoo.privacy.diff2_local import Diff2BVRLocalSGD
from zoo.privacy.diff2_module import Diff2Classifier

NOISE_SEED = 5


def make_local_model(num_features: int, rounds: int = 4, **overrides) -> Diff2Classifier:
    settings = {
        "num_features": num_features,
        "rounds": rounds,
        "restart_interval": 2,
        "lr": 1.0,
        "smoothness": 0.5,
        "target_epsilon": 2.0,
        "noise_seed": NOISE_SEED,
        "subroutine": "bvr-l-sgd",
        "local_steps": 3,
        "local_sample_rate": 0.2,
    }
    settings.update(overrides)
    return Diff2Classifier(**settings)


def test_resumed_local_run_equals_simulation(shared_data: Path, tmp_path: Path) -> None:
    data_root = small_adult(shared_data, tmp_path / "data")
    data = AdultDataModule(data_dir=str(data_root), batch_size=-1)
    data.setup()
    width = data.num_features

    pl.seed_everything(0)
    model = make_local_model(width)
    assert isinstance(model.algorithm, Diff2BVRLocalSGD)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    make_trainer(tmp_path, max_epochs=2).fit(model, datamodule=data)
    assert model.algorithm.round_index == 2

    resumed = make_local_model(width)
    trainer = make_trainer(tmp_path, max_epochs=10)
    trainer.fit(resumed, datamodule=data, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert resumed.algorithm.round_index == 4

    reference = make_local_model(width)
    reference.load_state_dict(initial)
    inputs, labels = data.train_tensors()
    shard = (inputs.to(torch.float64), labels.to(torch.float64))
    simulate_diff2(reference.algorithm, [shard], rounds=4, noise_seed=NOISE_SEED)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)

    # The logged epsilon composes the 4 * (3 - 1) local steps with the rounds.
    logged = trainer.callback_metrics["privacy/epsilon"].item()
    sigma_restart, sigma_difference = resumed.noise_multipliers
    local = resumed.local_privacy
    assert local is not None
    assert local.noise_multiplier > 0
    expected = diff2_epsilon(4, 2, sigma_restart, sigma_difference, 1e-5, local)
    assert logged == pytest.approx(expected)
    assert logged == pytest.approx(2.0, rel=1e-3)
    assert expected > diff2_epsilon(4, 2, sigma_restart, sigma_difference, 1e-5)
    assert trainer.callback_metrics["train/local_clip"].item() > 0


def test_privacy_spent_names_local_settings() -> None:
    model = make_local_model(
        10,
        rounds=6,
        target_epsilon=None,
        noise_multiplier_restart=2.0,
        noise_multiplier_difference=3.0,
        noise_multiplier_local=1.5,
    )
    spent = model.privacy_spent(rounds=6)
    assert spent["subroutine"] == "bvr-l-sgd"
    assert spent["local_steps"] == 3
    assert spent["local_sample_rate"] == 0.2
    assert spent["noise_multiplier_local"] == 1.5
    local = LocalStepsPrivacy(3, 0.2, 1.5)
    assert spent["epsilon"] == diff2_epsilon(6, 2, 2.0, 3.0, 1e-5, local)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"local_steps": 0}, "local_steps"), ({"local_share": 1.5}, "local_share")],
)
def test_gd_rejects_invalid_local_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_local_model(10, subroutine="gd", **kwargs)


def test_gd_privacy_spent_has_no_local_keys() -> None:
    model = make_local_model(10, subroutine="gd")
    assert model.local_privacy is None
    assert "local_steps" not in model.privacy_spent()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"subroutine": "sgd"}, "subroutine"),
        ({"local_steps": 0}, "local_steps"),
        ({"local_sample_rate": 2.0}, "local_sample_rate"),
        ({"local_share": 0.0}, "local_share"),
        ({"noise_multiplier_local": 1.0}, "not both"),
        (
            {
                "target_epsilon": None,
                "noise_multiplier_restart": 2.0,
                "noise_multiplier_difference": 2.0,
            },
            "noise_multiplier_local is None",
        ),
        (
            {
                "target_epsilon": None,
                "noise_multiplier_restart": 2.0,
                "noise_multiplier_difference": 2.0,
                "noise_multiplier_local": 0.0,
            },
            "noise_multiplier_local is 0",
        ),
        ({"restart_interval": 1, "smoothness": None}, "clip_local"),
        ({"clip_local": 0.0}, "clip_local must be a finite number > 0"),
        ({"clip_local": 0.0, "subroutine": "gd"}, "clip_local must be"),
        ({"smoothness": 0.0}, "smoothness must be a finite number > 0"),
    ],
)
def test_invalid_local_module_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_local_model(10, **kwargs)


def test_fixed_local_clip_without_smoothness() -> None:
    model = make_local_model(10, restart_interval=1, smoothness=None, clip_local=0.2)
    assert isinstance(model.algorithm, Diff2BVRLocalSGD)
    assert model.algorithm.clip_local == 0.2
    assert model.algorithm.local_smoothness is None


def test_resume_with_other_local_settings_rejected() -> None:
    first = make_local_model(10, rounds=6)
    first.algorithm.round_index = 6
    checkpoint: dict = {}
    first.on_save_checkpoint(checkpoint)
    for overrides in ({"local_steps": 4}, {"local_sample_rate": 0.1}, {"subroutine": "gd"}):
        other = make_local_model(10, rounds=6, **overrides)
        with pytest.raises(ValueError, match="would not cover the earlier rounds"):
            other.on_load_checkpoint(checkpoint)
    same = make_local_model(10, rounds=6)
    same.on_load_checkpoint(checkpoint)
    assert same.privacy_spent()["epsilon"] == pytest.approx(2.0, rel=1e-3)


def test_gd_checkpoint_rejected_by_local_model() -> None:
    gd = make_local_model(10, rounds=6, subroutine="gd")
    gd.algorithm.round_index = 6
    checkpoint: dict = {}
    gd.on_save_checkpoint(checkpoint)
    local = make_local_model(10, rounds=6)
    with pytest.raises(ValueError, match="would not cover the earlier rounds"):
        local.on_load_checkpoint(checkpoint)


def full_batch_loader(num_records: int, num_features: int = 10) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(num_records, num_features, generator=generator)
    labels = (inputs[:, 0] > 0).long()
    return DataLoader(TensorDataset(inputs, labels), batch_size=num_records)


def quick_trainer(max_epochs: int) -> pl.Trainer:
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


def test_local_sample_below_one_record_rejected() -> None:
    # 0.02 * 40 records = 0.8 expected records per local update.
    model = make_local_model(10, local_sample_rate=0.02)
    with pytest.raises(ValueError, match=r"local_sample_rate=0.02 expects 0.8 records"):
        quick_trainer(max_epochs=4).fit(model, train_dataloaders=full_batch_loader(40))
    assert model.algorithm.round_index == 0


def divergence_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    messages = [str(warning.message) for warning in caught]
    return [message for message in messages if "diverg" in message]


@pytest.mark.parametrize("subroutine", ["gd", "bvr-l-sgd"])
def test_diverging_run_warns_once(subroutine: str) -> None:
    # sigma2 = 1e4 on 50 records makes the first difference round's estimate explode.
    model = make_local_model(
        10,
        subroutine=subroutine,
        target_epsilon=None,
        noise_multiplier_restart=1.0,
        noise_multiplier_difference=1e4,
        noise_multiplier_local=1.0,
    )
    loader = full_batch_loader(50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(max_epochs=4).fit(model, train_dataloaders=loader, val_dataloaders=loader)
    found = divergence_warnings(caught)
    estimate_warnings = [message for message in found if message.startswith("DIFF2 is")]
    loss_warnings = [message for message in found if message.startswith("The val loss")]
    assert len(estimate_warnings) == 1, found
    assert "in round 1 " in estimate_warnings[0]
    assert len(loss_warnings) == 1, found


def test_stable_run_does_not_warn() -> None:
    model = make_local_model(
        10,
        target_epsilon=None,
        noise_multiplier_restart=1.0,
        noise_multiplier_difference=1.0,
        noise_multiplier_local=1.0,
    )
    loader = full_batch_loader(50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(max_epochs=4).fit(model, train_dataloaders=loader, val_dataloaders=loader)
    assert divergence_warnings(caught) == []
    assert model.algorithm.round_index == 4
