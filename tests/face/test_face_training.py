"""Face training through the ``zoo`` command: a tiny fit, resume after a kill, and DDP."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from helpers import REPO_ROOT, run_zoo
from PIL import Image

HERE = Path(__file__).resolve().parent


def _make_tree(root: Path, counts: list[int]) -> Path:
    rng = np.random.default_rng(0)
    for identity, count in enumerate(counts, start=1):
        folder = root / f"p{identity}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 255, (56, 46), dtype=np.uint8)
        for index in range(count):
            noise = rng.integers(-30, 30, base.shape)
            pixels = np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    return root


def _tiny_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "face-unpg",
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.max_epochs",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--data.init_args.root",
        str(root),
        "--data.init_args.num_val_identities",
        "2",
        "--data.init_args.batch_size",
        "8",
        "--model.init_args.num_classes",
        "6",
        *extra,
    ]


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    with open(files[-1]) as handle:
        return list(csv.DictReader(handle))


def _last_value(rows: list[dict[str, str]], key: str) -> float:
    values = [float(row[key]) for row in rows if row.get(key)]
    assert values, f"{key} was never logged"
    return values[-1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return checkpoint["state_dict"]


def test_fit_resume_after_kill_matches_uninterrupted(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "faces", [6] * 8)
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"

    run_zoo(_tiny_args(root, full_dir), cwd=tmp_path)
    rows = _metrics(full_dir)
    assert 0.0 <= _last_value(rows, "val/accuracy") <= 1.0
    assert _last_value(rows, "val/auc") > 0.0
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 8
    assert all(np.isfinite(losses))
    assert list(full_dir.glob("csv/version_*/verification_pairs.csv")), "pair list not saved"
    assert list(full_dir.glob("csv/version_*/figures/val_roc-step*.png")), "ROC figure missing"

    # Four steps per epoch: step 6 is in the middle of the second epoch.
    exit_callback = '{"class_path": "face_exit_callback.ExitAtStep", "init_args": {"step": 6}}'
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    killed = run_zoo(
        _tiny_args(root, killed_dir, f"--trainer.callbacks+={exit_callback}"),
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert killed.returncode == 3, killed.stderr[-3000:]
    run_zoo(_tiny_args(root, killed_dir, "--ckpt_path", "last"), cwd=tmp_path)

    full = _weights(full_dir / "checkpoints" / "last.ckpt")
    resumed = _weights(killed_dir / "checkpoints" / "last.ckpt")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.allclose(full[key].float(), resumed[key].float(), atol=1e-6), key
    resumed_rows = _metrics(killed_dir)
    assert _last_value(resumed_rows, "val/accuracy") == _last_value(rows, "val/accuracy")


def test_ddp_two_processes_uneven_shards(tmp_path: Path) -> None:
    # 23 training and 7 verification images: neither splits evenly over two processes.
    root = _make_tree(tmp_path / "faces", [5, 4, 4, 4, 3, 3, 4, 3])
    run_dir = tmp_path / "ddp"
    run_zoo(
        _tiny_args(
            root,
            run_dir,
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--data.init_args.batch_size",
            "4",
            "--model.init_args.unpg_gather",
            "true",
        ),
        cwd=tmp_path,
        timeout=600,
    )
    rows = _metrics(run_dir)
    accuracy_rows = [r for r in rows if r.get("val/accuracy")]
    assert len(accuracy_rows) == 2, "expected one validation row per epoch from rank zero"
    assert len(list(run_dir.glob("csv/version_*"))) == 1, "DDP must write one run"
    assert np.isfinite(_last_value(rows, "train/loss"))


def test_face_configs_share_seed_backbone_and_budget() -> None:
    import yaml

    configs = {
        name: yaml.safe_load((REPO_ROOT / "configs" / f"face-{name}.yaml").read_text())
        for name in ("arcface", "unpg")
    }
    arcface, unpg = configs["arcface"], configs["unpg"]
    assert arcface["model"]["init_args"]["unpg"] is False
    assert unpg["model"]["init_args"]["unpg"] is True
    assert unpg["data"]["init_args"]["data_dir"] is None
    arcface["model"]["init_args"].pop("unpg")
    unpg["model"]["init_args"].pop("unpg")
    for section in ("seed_everything", "trainer", "model", "data"):
        assert arcface[section] == unpg[section], section


def test_unknown_config_key_rejected(tmp_path: Path) -> None:
    process = run_zoo(
        ["train", "face-unpg", "--model.init_args.no_such_key", "1"],
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    assert process.returncode != 0
    assert "no_such_key" in process.stderr
