"""Tests of the ``zoo`` command: configs, saved configs, resuming, DDP, logging, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import run_zoo

import zoo
from zoo.cli import format_listing

INFRA_DIR = Path(__file__).resolve().parent
IRIS_CONFIG = """\
seed_everything: 0
trainer:
  max_epochs: 3
  accelerator: cpu
model:
  class_path: toy_models.IrisClassifier
  init_args:
    hidden: 16
data:
  class_path: toy_models.IrisDataModule
"""
TOY_ENV = {"PYTHONPATH": os.pathsep.join([str(INFRA_DIR), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def iris_config(tmp_path: Path) -> Path:
    path = tmp_path / "iris.yaml"
    path.write_text(IRIS_CONFIG)
    return path


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_saved_config_drives_validate_test_predict(iris_config: Path, tmp_path: Path) -> None:
    fit = run_zoo(["fit", "--config", str(iris_config)], cwd=tmp_path, env=TOY_ENV)
    run_dir = tmp_path / "runs" / "iris"
    saved = run_dir / "csv" / "version_0" / "config.yaml"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert saved.is_file()
    assert last.is_file()
    assert "epoch 2 done" in fit.stderr + fit.stdout
    for command in ("validate", "test", "predict"):
        result = run_zoo(
            [command, "--config", str(saved), "--ckpt_path", str(last)], cwd=tmp_path, env=TOY_ENV
        )
        assert "Loaded model weights" in result.stderr + result.stdout
    metrics = (run_dir / "csv" / "version_2" / "metrics.csv").read_text()
    assert "test_acc" in metrics


def test_resume_matches_uninterrupted_run(iris_config: Path, tmp_path: Path) -> None:
    run_zoo(
        ["fit", "--config", str(iris_config), "--trainer.default_root_dir", "runs/a"],
        cwd=tmp_path,
        env=TOY_ENV,
    )
    # Step 10 lies in the middle of the second epoch (7 batches per epoch).
    crashed = run_zoo(
        [
            "fit",
            "--config",
            str(iris_config),
            "--trainer.default_root_dir",
            "runs/b",
            "--model.crash_at_step",
            "10",
        ],
        cwd=tmp_path,
        env=TOY_ENV,
        check=False,
    )
    assert crashed.returncode != 0
    assert "crash requested at step 10" in crashed.stderr
    run_zoo(
        [
            "fit",
            "--config",
            str(iris_config),
            "--trainer.default_root_dir",
            "runs/b",
            "--ckpt_path",
            "last",
        ],
        cwd=tmp_path,
        env=TOY_ENV,
    )
    uninterrupted = _weights(tmp_path / "runs/a/checkpoints/last.ckpt")
    resumed = _weights(tmp_path / "runs/b/checkpoints/last.ckpt")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_ddp_two_cpu_processes_one_wandb_run(iris_config: Path, tmp_path: Path) -> None:
    result = run_zoo(
        [
            "fit",
            "--config",
            str(iris_config),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
        ],
        cwd=tmp_path,
        env={**TOY_ENV, "WANDB_MODE": "offline"},
        timeout=300,
    )
    wandb_dir = tmp_path / "runs" / "iris" / "wandb"
    offline_runs = sorted(wandb_dir.glob("offline-run-*"))
    assert len(offline_runs) == 1, offline_runs
    # 100 training rows on 2 ranks at batch 16: 4 batches per rank and epoch.
    assert "epoch 2 done" in result.stderr + result.stdout


def test_unknown_config_key_is_rejected(iris_config: Path, tmp_path: Path) -> None:
    result = run_zoo(
        ["fit", "--config", str(iris_config), "--model.init_args.hiden", "3"],
        cwd=tmp_path,
        env=TOY_ENV,
        check=False,
    )
    assert result.returncode != 0
    assert "hiden" in result.stderr


def test_train_unknown_name_suggests_close_names(tmp_path: Path) -> None:
    registered = zoo.list_models()
    typo = registered[0][:-1] + "x"
    result = run_zoo(["train", typo], cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert f"Unknown model '{typo}'" in result.stderr
    assert registered[0] in result.stderr


def test_list_shows_models_and_checkpoints() -> None:
    listing = format_listing()
    for name in zoo.list_models():
        assert f"  {name}" in listing
    for name in zoo.list_pretrained():
        assert name in listing


@pytest.mark.parametrize("name", zoo.list_models())
def test_registered_config_parses(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from zoo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", name, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_integer_batch_limit_counts_batches(iris_config: Path, tmp_path: Path) -> None:
    run_zoo(
        ["fit", "--config", str(iris_config), "--trainer.limit_train_batches", "1"],
        cwd=tmp_path,
        env=TOY_ENV,
    )
    checkpoint = torch.load(
        tmp_path / "runs" / "iris" / "checkpoints" / "last.ckpt", weights_only=False
    )
    # Three epochs of one batch each; read as the fraction 1.0 they would be whole epochs.
    assert checkpoint["global_step"] == 3
    saved = tmp_path / "runs" / "iris" / "csv" / "version_0" / "config.yaml"
    assert "limit_train_batches: 1\n" in saved.read_text()


def test_integer_trainer_options_follow_argument_order(tmp_path: Path) -> None:
    from zoo.cli import integer_trainer_options

    config = tmp_path / "limits.yaml"
    config.write_text("trainer:\n  limit_val_batches: 2\n  val_check_interval: 0.5\n")
    trainer_file = tmp_path / "trainer.yaml"
    trainer_file.write_text("overfit_batches: 2\n")
    args = [
        "fit",
        "--trainer.limit_train_batches",
        "1",
        "--config",
        str(config),
        "--trainer.limit_test_batches=0.25",
        "--trainer.limit_val_batches=3",
        "--trainer.max_steps",
        "4",
    ]
    assert integer_trainer_options(args) == {"limit_train_batches": 1, "limit_val_batches": 3}
    short = ["fit", "-c", str(config), "--trainer", str(trainer_file)]
    assert integer_trainer_options(short) == {"limit_val_batches": 2, "overfit_batches": 2}
    inline = ["fit", "--trainer", "{limit_train_batches: 1, limit_val_batches: 0.5}"]
    assert integer_trainer_options(inline) == {"limit_train_batches": 1}


def test_invalid_value_gives_short_error(tmp_path: Path) -> None:
    process = run_zoo(
        [
            "train",
            "diff2-lvr-adult",
            "--model.init_args.local_steps",
            "0",
            "--trainer.max_steps",
            "0",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert process.returncode != 0
    assert "zoo: error: local_steps must be an int >= 1, got 0." in process.stderr
    assert "Traceback" not in process.stderr
