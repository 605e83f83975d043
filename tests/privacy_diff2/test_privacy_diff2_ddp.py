"""DIFF2 through the ``zoo`` command with two DDP workers, against the simulation."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import run_zoo
from torch.utils.data import DistributedSampler

from zoo.datamodules.adult import AdultDataModule
from zoo.privacy.diff2_module import Diff2Classifier

DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
ROUNDS = 3
NOISE_SEED = 11


def read_metrics(root: Path) -> list[dict[str, str]]:
    files = sorted(root.glob("csv/version_*/metrics.csv"))
    assert files, f"no CSV metrics under {root}"
    rows: list[dict[str, str]] = []
    for path in files:
        with open(path) as handle:
            rows += list(csv.DictReader(handle))
    return rows


# diff2-lvr-adult runs the BVR-L-SGD subroutine: local steps on each rank and an
# all_reduce of the record-weighted local iterates after every round.
@pytest.mark.parametrize("name", ["diff2-adult", "diff2-lvr-adult"])
def test_ddp_workers_match_simulation(name: str, shared_data: Path, tmp_path: Path) -> None:
    args = [
        "train",
        name,
        *DDP,
        "--data.data_dir",
        str(shared_data),
        "--model.rounds",
        str(ROUNDS),
        "--trainer.max_epochs",
        str(ROUNDS),
        "--model.noise_seed",
        str(NOISE_SEED),
    ]
    run_zoo(args, cwd=tmp_path, timeout=300)
    root = tmp_path / "runs" / name
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["diff2"]["round_index"] == ROUNDS

    # Both processes' shards entered every round's sum.
    data = AdultDataModule(data_dir=str(shared_data), batch_size=-1)
    data.trainer = SimpleNamespace(world_size=2)
    data.setup()
    inputs, labels = data.train_tensors()
    rows = [row for row in read_metrics(root) if row.get("train/workers")]
    assert len(rows) == ROUNDS
    for row in rows:
        assert float(row["train/workers"]) == 2.0
        assert float(row["train/records"]) == float(len(inputs))

    # The same algorithm code with both workers in one process gives the same iterate.
    # Lightning gives each rank a DistributedSampler that shuffles with seed 0 (the
    # config's seed_everything) and the epoch, so the shards change every round. The
    # order of a shard matters to the Poisson samples of the local steps.
    pl.seed_everything(0)
    hparams = {
        key: value
        for key, value in checkpoint["hyper_parameters"].items()
        if not key.startswith("_")
    }
    model = Diff2Classifier(**hparams)
    inputs, targets = inputs.to(torch.float64), labels.to(torch.float64)
    for epoch in range(ROUNDS):
        shards = []
        for rank in range(2):
            sampler = DistributedSampler(inputs, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            indices = torch.tensor(list(sampler))
            shards.append((inputs[indices], targets[indices]))
        model.algorithm.simulate_round(shards, len(inputs), noise_seed=NOISE_SEED)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(
            checkpoint["state_dict"][name], value, rtol=1e-9, atol=1e-12, msg=name
        )
