"""Train the registered DP-SGD MNIST models and measure their test accuracy and epsilon.

For each ``dp-mnist-eps*`` config this runs ``zoo train NAME`` in a subprocess, loads the
last checkpoint, evaluates it on the 10,000 official MNIST test images, and reads epsilon
from the checkpoint's privacy state. ``--export NAME`` also writes that run as the pretrained
checkpoint ``checkpoints/NAME.pt`` with its manifest.

Usage::

    python benchmarks/privacy_dpsgd_mnist.py --data-dir "$ZOO_DATA_DIR" \\
        --models dp-mnist-eps1 dp-mnist-eps3 dp-mnist-eps8 --export dp-mnist-eps3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from zoo import hub
from zoo.datamodules.mnist import MNISTDataModule
from zoo.privacy.classifier import Classifier

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_accuracy(model: Classifier, data_dir: str) -> float:
    """Return the accuracy of ``model`` on the 10,000 MNIST test images."""
    dm = MNISTDataModule(data_dir=data_dir, download=False, batch_size=1000)
    dm.setup("test")
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += (model(x).argmax(dim=1) == y).sum().item()
    return correct / len(dm.test_set)


def train(name: str, data_dir: str, root: Path, extra_args: list[str]) -> tuple[Path, float]:
    """Run ``zoo train NAME`` into ``root/NAME`` and return its last checkpoint and wall time."""
    run_dir = root / name
    command = [
        sys.executable,
        "-m",
        "zoo.cli",
        "train",
        name,
        "--data.init_args.data_dir",
        data_dir,
        "--data.init_args.download",
        "false",
        "--trainer.default_root_dir",
        str(run_dir),
        *extra_args,
    ]
    logger.info("Running %s", " ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO_ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    return run_dir / "checkpoints" / "last.ckpt", time.perf_counter() - start


def main() -> None:
    """Parse arguments, train and evaluate each model, and print a JSON line per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder that contains mnist/")
    parser.add_argument("--models", nargs="+", default=["dp-mnist-eps1", "dp-mnist-eps3"])
    parser.add_argument("--runs", default="runs/privacy-benchmark", help="output folder")
    parser.add_argument(
        "--export", nargs="*", default=[], help="models to export as pretrained checkpoints"
    )
    parser.add_argument("--results", default=None, help="append JSON lines to this file")
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help="evaluate the runs already in --runs instead of training",
    )
    args, extra_args = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    for name in args.models:
        if args.skip_training:
            checkpoint_path = Path(args.runs) / name / "checkpoints" / "last.ckpt"
            seconds = float("nan")
        else:
            checkpoint_path, seconds = train(name, args.data_dir, Path(args.runs), extra_args)
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        # LightningCLI adds "_class_path" and similar private keys to the saved hyperparameters.
        hyper_parameters = checkpoint["hyper_parameters"]
        model = Classifier(**{k: v for k, v in hyper_parameters.items() if not k.startswith("_")})
        model.load_state_dict(checkpoint["state_dict"])
        accuracy = test_accuracy(model, args.data_dir)
        privacy = checkpoint["privacy"]
        result = {
            "model": name,
            "test_accuracy": accuracy,
            "epsilon": privacy["epsilon"],
            "delta": privacy["delta"],
            "noise_multiplier": privacy["noise_multiplier"],
            "sample_rate": privacy["sample_rate"],
            "steps": privacy["steps"],
            "epochs": checkpoint["epoch"] + 1,
            "accountant": privacy["accountant"],
            "wall_seconds": seconds,
        }
        print(json.dumps(result), flush=True)
        if args.results:
            with open(args.results, "a") as handle:
                handle.write(json.dumps(result) + "\n")
        if name in args.export:
            hub.export_pretrained(
                model,
                name,
                model=name,
                metric={
                    "name": "test_accuracy",
                    "value": accuracy,
                    "data": "MNIST test set (10,000 images, original IDX files)",
                    "protocol": "argmax of logits, model in eval mode, full test set",
                },
                data_license="MNIST: Yann LeCun and Corinna Cortes, CC BY-SA 3.0",
                extra={"privacy": {key: privacy[key] for key in PRIVACY_MANIFEST_KEYS}},
                out_dir=REPO_ROOT / "checkpoints",
            )


#: Privacy state fields copied into a pretrained checkpoint's manifest ``extra.privacy``.
PRIVACY_MANIFEST_KEYS = (
    "mechanism",
    "epsilon",
    "delta",
    "accountant",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "expected_batch_size",
    "steps",
    "total_steps",
    "history",
    "version",
)


if __name__ == "__main__":
    main()
