"""Tests of the DIFF2 Lightning module: resumption, privacy logging and input checks."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from zoo.datamodules.adult import AdultDataModule
from zoo.privacy.diff2 import simulate_diff2
from zoo.privacy.diff2_accounting import diff2_epsilon
from zoo.privacy.diff2_module import Diff2Classifier

NOISE_SEED = 3


def small_adult(shared_data: Path, root: Path, records: int = 400) -> Path:
    """Copy the first ``records`` lines of both real Adult files into ``root``."""
    folder = root / "adult" / "uci"
    folder.mkdir(parents=True)
    for name in ("adult.data", "adult.test"):
        lines = (shared_data / "adult" / "uci" / name).read_text().splitlines()
        (folder / name).write_text("\n".join(lines[: records + 1]) + "\n")
    return root


def make_model(num_features: int, rounds: int = 4) -> Diff2Classifier:
    return Diff2Classifier(
        num_features=num_features,
        rounds=rounds,
        restart_interval=2,
        lr=1.0,
        smoothness=0.5,
        target_epsilon=2.0,
        noise_seed=NOISE_SEED,
    )


def make_trainer(root: Path, max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
    )


def test_resumed_run_equals_simulation(shared_data: Path, tmp_path: Path) -> None:
    data_root = small_adult(shared_data, tmp_path / "data")
    data = AdultDataModule(data_dir=str(data_root), batch_size=-1)
    data.setup()
    width = data.num_features

    pl.seed_everything(0)
    model = make_model(width)
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    make_trainer(tmp_path, max_epochs=2).fit(model, datamodule=data)
    assert model.algorithm.round_index == 2

    resumed = make_model(width)
    trainer = make_trainer(tmp_path, max_epochs=10)
    trainer.fit(resumed, datamodule=data, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert resumed.algorithm.round_index == 4, "training stops after `rounds` rounds"
    assert trainer.current_epoch == 4

    reference = make_model(width)
    reference.load_state_dict(initial)
    inputs, labels = data.train_tensors()
    shard = (inputs.to(torch.float64), labels.to(torch.float64))
    simulate_diff2(reference.algorithm, [shard], rounds=4, noise_seed=NOISE_SEED)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)

    logged = trainer.callback_metrics["privacy/epsilon"].item()
    sigma_restart, sigma_difference = resumed.noise_multipliers
    assert logged == pytest.approx(diff2_epsilon(4, 2, sigma_restart, sigma_difference, 1e-5))
    assert logged == pytest.approx(2.0, rel=1e-3)


def test_minibatch_loader_rejected(shared_data: Path, tmp_path: Path) -> None:
    data_root = small_adult(shared_data, tmp_path / "data")
    data = AdultDataModule(data_dir=str(data_root), batch_size=64)
    model = make_model(data.num_features)
    with pytest.raises(ValueError, match="batch_size=-1"):
        make_trainer(tmp_path, max_epochs=1).fit(model, datamodule=data)


def test_wrong_feature_width_rejected() -> None:
    model = make_model(num_features=5)
    with pytest.raises(ValueError, match="num_features"):
        model.validation_step((torch.zeros(3, 7), torch.zeros(3, dtype=torch.long)), 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": None}, "train without privacy"),
        ({"noise_multiplier_restart": 2.0}, "not both"),
        ({"target_epsilon": None, "noise_multiplier_restart": 2.0}, "difference"),
        ({"rounds": 0}, "rounds"),
        (
            {"target_epsilon": None, "noise_multiplier_restart": 0.0, "restart_interval": 1},
            "noise_multiplier_restart is 0",
        ),
        (
            {
                "target_epsilon": None,
                "noise_multiplier_restart": 2.0,
                "noise_multiplier_difference": 0.0,
            },
            "noise_multiplier_difference is 0",
        ),
        ({"activation": "swish"}, "activation"),
        ({"noise_seed": -1}, "noise_seed"),
    ],
)
def test_invalid_module_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Diff2Classifier(num_features=10, **kwargs)


def test_dp_gd_needs_no_difference_settings() -> None:
    model = Diff2Classifier(
        num_features=10,
        restart_interval=1,
        smoothness=None,
        target_epsilon=None,
        noise_multiplier_restart=3.0,
    )
    assert model.noise_multipliers == (3.0, 0.0)
    assert model.privacy_spent(rounds=100)["epsilon"] > 0


def test_resume_with_other_noise_rejected() -> None:
    first = Diff2Classifier(num_features=10, rounds=6, restart_interval=5, target_epsilon=4.0)
    first.algorithm.round_index = 6
    checkpoint: dict = {}
    first.on_save_checkpoint(checkpoint)
    longer = Diff2Classifier(num_features=10, rounds=8, restart_interval=5, target_epsilon=4.0)
    with pytest.raises(ValueError, match="would not cover the earlier rounds"):
        longer.on_load_checkpoint(checkpoint)
    same = Diff2Classifier(num_features=10, rounds=6, restart_interval=5, target_epsilon=4.0)
    same.on_load_checkpoint(checkpoint)
    assert same.algorithm.round_index == 6
    assert same.privacy_spent()["epsilon"] == pytest.approx(4.0, rel=0.02)
