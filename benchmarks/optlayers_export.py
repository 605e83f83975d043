"""Evaluate a trained optlayers run and export it as a pretrained checkpoint of the zoo.

Train first, then export from the run's last checkpoint, from the repository root::

    zoo train opt-bilevel-breast-cancer
    python benchmarks/optlayers_export.py opt-bilevel-breast-cancer

The script loads ``runs/NAME/checkpoints/last.ckpt``, measures the model's metric on its
test split (the same function the tests use to reproduce it), and writes
``checkpoints/NAME.pt`` and ``checkpoints/NAME.json`` with ``zoo.hub.export_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from zoo import hub

logger = logging.getLogger("optlayers_export")


def bilevel_metric(module: torch.nn.Module, data_args: dict) -> tuple[dict, dict]:
    from zoo.datamodules.breast_cancer import BreastCancerBilevelDataModule

    from zoo.optlayers.bilevel import evaluate_split

    datamodule = BreastCancerBilevelDataModule(**data_args)
    datamodule.setup()
    test = evaluate_split(module, datamodule.splits, "test")
    val = evaluate_split(module, datamodule.splits, "val")
    metric = {
        "name": "test_loss",
        "value": test["loss"],
        "data": "scikit-learn load_breast_cancer, BreastCancerBilevelDataModule split "
        f"(seed {datamodule.seed}, {datamodule.inner_size} inner, {datamodule.val_size} "
        "validation, rest test)",
        "protocol": "inner logistic regression refit by Newton on the inner split with the "
        "learned per-feature L2 strengths; mean logistic loss on the test split",
    }
    extra = {
        "test_accuracy": test["accuracy"],
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
    }
    return metric, extra


EXPORTERS: dict[str, tuple[Callable[[torch.nn.Module, dict], tuple[dict, dict]], str]] = {
    "opt-bilevel-breast-cancer": (
        bilevel_metric,
        "UCI Breast Cancer Wisconsin (Diagnostic) data as bundled with scikit-learn "
        "(scikit-learn is BSD-3-Clause; the UCI Machine Learning Repository sets the data's "
        "terms)",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(EXPORTERS), help="registered model to export")
    parser.add_argument("--ckpt", default=None, help="Lightning checkpoint (default: last.ckpt)")
    parser.add_argument("--out-dir", default="checkpoints", help="destination folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    ckpt = Path(args.ckpt or f"runs/{args.name}/checkpoints/last.ckpt")
    if not ckpt.is_file():
        raise FileNotFoundError(f"Checkpoint {ckpt} not found; run `zoo train {args.name}` first.")
    config = hub.load_config(args.name)
    model_class = hub.import_class(config["model"]["class_path"])
    module = model_class.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    module.eval()
    metric_fn, data_license = EXPORTERS[args.name]
    metric, extra = metric_fn(module, dict(config["data"].get("init_args") or {}))
    logger.info("metric %s, extra %s", json.dumps(metric), json.dumps(extra))
    hub.export_pretrained(
        module,
        args.name,
        model=args.name,
        metric=metric,
        data_license=data_license,
        extra=extra,
        out_dir=args.out_dir,
    )


if __name__ == "__main__":
    main()
