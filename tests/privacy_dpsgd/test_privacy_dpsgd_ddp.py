"""DP-SGD through the zoo command under two-process CPU DDP."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml
from opacus.accountants import RDPAccountant

from tests.helpers import REPO_ROOT, run_zoo


@pytest.mark.parametrize(("mode", "active"), [("auto", "ew"), ("ghost", "ghost")])
def test_dp_mnist_config_under_two_process_ddp(
    shared_data: Path, tmp_path: Path, mode: str, active: str
) -> None:
    config = yaml.safe_load((REPO_ROOT / "configs" / "dp-mnist-eps3.yaml").read_text())
    dpsgd = config["trainer"]["callbacks"][0]["init_args"]
    # The RDP accountant calibrates in well under a second; PRV takes several.
    dpsgd["accountant"] = "rdp"
    dpsgd["max_physical_batch_size"] = 48
    dpsgd["grad_sample_mode"] = mode
    config["data"]["init_args"].update({"subset": 1024, "val_size": 1000, "batch_size": 128})
    config["trainer"].update({"max_epochs": 1, "limit_val_batches": 2})
    config_path = tmp_path / "dp-mnist-ddp.yaml"
    config_path.write_text(yaml.safe_dump(config))

    process = run_zoo(
        [
            "fit",
            "--config",
            str(config_path),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--data.init_args.data_dir",
            str(shared_data),
            "--data.init_args.download",
            "false",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    output = process.stdout + process.stderr
    assert "DifferentiallyPrivateDistributedDataParallel" in output
    assert f"grad_sample_mode={active}," in output

    metrics_files = list((tmp_path / "run").rglob("metrics.csv"))
    assert len(metrics_files) == 1
    with open(metrics_files[0]) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("privacy/epsilon")]
    assert len(rows) == 1
    # 1,024 examples in logical batches of 128 (split across both processes): sample rate
    # 1/8 and 8 private steps in the epoch, with the noise calibrated for epsilon 3.
    assert float(rows[0]["privacy/steps"]) == 8
    epsilon = float(rows[0]["privacy/epsilon"])
    assert 3.0 - 0.02 <= epsilon <= 3.0
    checkpoint = next((tmp_path / "run").rglob("last.ckpt"))
    privacy = torch.load(checkpoint, weights_only=True)["privacy"]
    reference = RDPAccountant()
    reference.history = [(privacy["noise_multiplier"], 1 / 8, 8)]
    assert privacy["sample_rate"] == pytest.approx(1 / 8)
    assert epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)
