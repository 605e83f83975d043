"""ODE classifier and latent ODE: construction, input errors, short training, the CLI, DDP."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import zoo
from tests.helpers import run_zoo
from zoo.datamodules.digits import DigitsDataModule
from zoo.datamodules.mocap import MocapDataModule
from zoo.ode.classifier import ODEClassifier
from zoo.ode.latent import LatentODE

ODE_MODELS = [name for name in zoo.list_models("ode-*")]


def quiet_trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_every_ode_config_builds() -> None:
    assert {"ode-mnist", "ode-mnist-ernode", "ode-mnist-srnode", "ode-digits-ernode"} <= set(
        ODE_MODELS
    )
    assert {"ode-mocap", "ode-mocap-ernode", "ode-mocap-srnode"} <= set(ODE_MODELS)
    for name in ODE_MODELS:
        model = zoo.create_model(name)
        assert isinstance(model, ODEClassifier | LatentODE), name


def test_classifier_rejects_wrong_image_shape() -> None:
    model = ODEClassifier(image_shape=[1, 8, 8], downsample="flatten", hidden_size=8)
    with pytest.raises(ValueError, match=r"\[batch, 1, 8, 8\]"):
        model(torch.zeros(2, 1, 28, 28))


def test_classifier_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="regularizer='ernodes'"):
        ODEClassifier(regularizer="ernodes")
    with pytest.raises(ValueError, match="downsample='conv'"):
        ODEClassifier(downsample="conv")
    with pytest.raises(ValueError, match="pool_factor=3"):
        ODEClassifier(downsample="avgpool", pool_factor=3)
    with pytest.raises(ValueError, match="final=0"):
        ODEClassifier(reg_weight=10.0, reg_weight_final=0.0)


def test_models_reject_bad_solver_and_optimizer_arguments() -> None:
    with pytest.raises(ValueError, match="Unknown method 'rk4'"):
        ODEClassifier(method="rk4")
    with pytest.raises(ValueError, match="Unknown method 'rk4'"):
        LatentODE(method="rk4")
    with pytest.raises(ValueError, match="weight_decay=-1.0"):
        ODEClassifier(weight_decay=-1.0)
    with pytest.raises(ValueError, match="final=-1"):
        ODEClassifier(reg_weight=0.0, reg_weight_final=-1.0)


def test_classifier_learns_digits_above_chance() -> None:
    pl.seed_everything(0)
    model = ODEClassifier(
        image_shape=[1, 8, 8],
        downsample="flatten",
        hidden_size=32,
        regularizer="ernode",
        reg_weight=10.0,
        rtol=1e-4,
        atol=1e-4,
        lr=1e-2,
    )
    data = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, data)
    assert trainer.callback_metrics["ode/train_reg_error_estimate"] > 0
    result = trainer.validate(model, data, verbose=False)[0]
    # Ten classes: chance is 0.1. One epoch of 19 batches reaches about 0.9.
    assert result["val/acc"] > 0.6
    assert result["ode/val_nfe"] >= 8


def test_classifier_reg_weight_anneals_over_epochs() -> None:
    model = ODEClassifier(
        image_shape=[1, 8, 8],
        downsample="flatten",
        hidden_size=8,
        regularizer="ernode",
        reg_weight=100.0,
        reg_weight_final=10.0,
        rtol=1e-3,
        atol=1e-3,
    )
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule())
    # After the last epoch (epoch 1 of 2) the weight is 100 * (10/100)^(1/2).
    assert model.ode_stats["reg_weight"] == pytest.approx(100.0 * 0.1**0.5)


def test_annealing_without_epoch_limit_raises() -> None:
    model = ODEClassifier(
        image_shape=[1, 8, 8],
        downsample="flatten",
        hidden_size=8,
        regularizer="ernode",
        reg_weight=100.0,
        reg_weight_final=10.0,
        rtol=1e-3,
        atol=1e-3,
    )
    # Without max_epochs the decay has no length; a silent default would shrink the
    # weight tenfold every epoch.
    trainer = quiet_trainer(max_epochs=-1, max_steps=2, limit_val_batches=0)
    with pytest.raises(ValueError, match="reg_anneal_epochs"):
        trainer.fit(model, DigitsDataModule())
    model.hparams.reg_anneal_epochs = 4
    trainer = quiet_trainer(max_epochs=-1, max_steps=2, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule())
    assert model.ode_stats["reg_weight"] == pytest.approx(100.0)


def test_latent_ode_training_lowers_loss(shared_data: Path) -> None:
    pl.seed_everything(0)
    data = MocapDataModule(data_dir=str(shared_data), download=False, batch_size=32)
    data.setup()
    model = LatentODE(latent_size=8, encoder_hidden_size=32, ode_hidden_size=32, lr=1e-2)
    values, mask, times = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = model.eval()(values, mask, times)
    model.train()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=8, limit_val_batches=0)
    trainer.fit(model, data)
    with torch.no_grad():
        after = model.eval()(values, mask, times)
    assert after.shape == values.shape
    mse_before = (before - values).pow(2).mean().item()
    mse_after = (after - values).pow(2).mean().item()
    assert mse_after < 0.9 * mse_before


def test_latent_ode_rejects_mixed_time_grids() -> None:
    model = LatentODE(num_features=3, latent_size=2, encoder_hidden_size=4, ode_hidden_size=4)
    values = torch.zeros(2, 4, 3)
    mask = torch.ones(2, 4, dtype=torch.bool)
    times = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 4.0]])
    with pytest.raises(ValueError, match="share one time grid"):
        model(values, mask, times)
    with pytest.raises(ValueError, match="num_features"):
        model(torch.zeros(2, 4, 5), mask, times[0])


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    with open(files[-1]) as handle:
        return list(csv.DictReader(handle))


def test_zoo_train_digits_logs_ode_stats(tmp_path: Path) -> None:
    run_zoo(
        [
            "train",
            "ode-digits-ernode",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.limit_val_batches",
            "1",
        ],
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "ode-digits-ernode"
    rows = read_metrics(run_dir)
    train_rows = [row for row in rows if row.get("ode/train_nfe")]
    assert train_rows, f"no ode/train_nfe in {rows}"
    assert float(train_rows[-1]["ode/train_nfe"]) > 0
    assert float(train_rows[-1]["ode/train_reg_weight"]) == pytest.approx(100.0)
    assert list(run_dir.glob("csv/version_*/figures/ode_nfe-step*.png"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]


def test_zoo_train_digits_under_ddp(tmp_path: Path) -> None:
    budget = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    budget += ["--trainer.limit_val_batches", "1"]
    run_zoo(["train", "ode-digits-ernode", *DDP, *budget], cwd=tmp_path)
    rows = read_metrics(tmp_path / "runs" / "ode-digits-ernode")
    assert any(row.get("val/acc") for row in rows)


def test_zoo_train_mocap_under_ddp(tmp_path: Path, shared_data: Path) -> None:
    budget = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    budget += ["--trainer.limit_val_batches", "1"]
    data = ["--data.init_args.data_dir", str(shared_data), "--data.init_args.download", "false"]
    run_zoo(["train", "ode-mocap-srnode", *DDP, *budget, *data], cwd=tmp_path)
    rows = read_metrics(tmp_path / "runs" / "ode-mocap-srnode")
    assert any(row.get("val/mse") for row in rows)
    assert any(row.get("ode/val_reg_stiffness_estimate") for row in rows)
