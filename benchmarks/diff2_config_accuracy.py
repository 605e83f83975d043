"""Train a registered DIFF2 config with fixed noise seeds and report its test accuracy.

Each run builds the model from ``configs/<model>.yaml``, trains it for the config's
``rounds`` in one process with ``noise_seed`` set (so the run repeats), and measures the
accuracy on every ``adult.test`` record and the spent epsilon.

Example (the ``diff2-lvr-adult`` line of docs/benchmarks.md)::

    ZOO_DATA_DIR=/path/to/data OMP_NUM_THREADS=1 python benchmarks/diff2_config_accuracy.py \\
        --model diff2-lvr-adult --noise-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import lightning.pytorch as pl
import torch

from zoo import hub
from zoo.datamodules.adult import AdultDataModule
from zoo.privacy.diff2_module import Diff2Classifier

logger = logging.getLogger(__name__)


def test_accuracy(model: Diff2Classifier, data: AdultDataModule) -> float:
    """Return the model's accuracy on the whole ``adult.test`` split."""
    data.setup("test")
    inputs, labels = data.test_set.tensors
    model.eval()
    with torch.no_grad():
        predictions = (model(inputs) > 0).long()
    return float((predictions == labels).double().mean())


def train_once(name: str, noise_seed: int, data_dir: str | None) -> tuple[float, float]:
    """Train config ``name`` with ``noise_seed`` and return (test accuracy, spent epsilon)."""
    config = hub.load_config(name)
    pl.seed_everything(config.get("seed_everything", 0))
    model = hub.create_model(name, noise_seed=noise_seed)
    if not isinstance(model, Diff2Classifier):
        raise ValueError(f"{name} builds a {type(model).__name__}, not a Diff2Classifier.")
    data = AdultDataModule(**{**config["data"]["init_args"], "data_dir": data_dir})
    trainer = pl.Trainer(
        max_epochs=model.hparams.rounds,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    return test_accuracy(model, data), float(model.privacy_spent()["epsilon"])


def main(argv: list[str] | None = None) -> None:
    """Train once per noise seed and print the accuracies."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="diff2-lvr-adult", help="registered config name")
    parser.add_argument("--noise-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--data-dir", default=None, help="folder that contains adult/uci/ (default: $ZOO_DATA_DIR)"
    )
    args = parser.parse_args(argv)
    if any(seed < 0 for seed in args.noise_seeds):
        parser.error(f"--noise-seeds must be >= 0, got {args.noise_seeds}")
    torch.set_num_threads(1)
    accuracies = []
    for seed in args.noise_seeds:
        start = time.perf_counter()
        accuracy, epsilon = train_once(args.model, seed, args.data_dir)
        accuracies.append(accuracy)
        logger.info(
            "%s noise_seed=%d: test accuracy %.4f at epsilon %.4f (%.0f s)",
            args.model,
            seed,
            accuracy,
            epsilon,
            time.perf_counter() - start,
        )
    spread = statistics.pstdev(accuracies)
    print(f"{args.model}: test accuracy {statistics.fmean(accuracies):.4f} ± {spread:.4f}")


if __name__ == "__main__":
    main()
