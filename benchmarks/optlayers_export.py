"""Evaluate a trained optlayers run and export it as a pretrained checkpoint of the zoo.

Train first, then export from the run's last checkpoint, from the repository root::

    zoo train opt-bilevel-breast-cancer
    python benchmarks/optlayers_export.py opt-bilevel-breast-cancer

``opt-distill-digits`` also writes the image grid ``docs/figures/opt-distill-digits.png``.

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


def _digits_splits(data_args: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from zoo.datamodules.digits import DigitsDataModule

    datamodule = DigitsDataModule(**data_args)
    datamodule.setup()
    return {
        "train": datamodule.train_set.tensors,
        "val": datamodule.val_set.tensors,
        "test": datamodule.test_set.tensors,
    }


DIGITS_DATA = (
    "scikit-learn load_digits (1,797 8x8 images), DigitsDataModule split (seed {seed}, "
    "{test} test, {val} validation, rest training)"
)


def qpnet_metric(module: torch.nn.Module, data_args: dict) -> tuple[dict, dict]:
    from zoo.optlayers.optnet import evaluate_accuracy

    splits = _digits_splits(data_args)
    metric = {
        "name": "test_accuracy",
        "value": evaluate_accuracy(module, *splits["test"]),
        "data": DIGITS_DATA.format(
            seed=data_args.get("seed", 0),
            test=data_args.get("test_size", 300),
            val=data_args.get("val_size", 300),
        ),
        "protocol": "top-1 accuracy of the trained network on the test split",
    }
    extra = {"val_accuracy": evaluate_accuracy(module, *splits["val"])}
    return metric, extra


def distillation_metric(module: torch.nn.Module, data_args: dict) -> tuple[dict, dict]:
    from zoo.optlayers.distillation import accuracy_of_training_set, distilled_image_grid

    splits = _digits_splits(data_args)
    hp = module.hparams
    train_images, train_labels = splits["train"]
    test_images, test_labels = splits["test"]

    def accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
        return accuracy_of_training_set(
            images, labels, test_images, test_labels, hp.num_classes, hp.l2_reg
        )

    distilled = accuracy(module.distilled.detach(), module.distilled_labels)
    # Baselines with as many images: real training images drawn at random per class (mean
    # over 20 seeded draws), and the per-class mean image.
    random_accuracies = []
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for label in range(hp.num_classes):
            indices = torch.nonzero(train_labels == label).flatten()
            pick = torch.randperm(len(indices), generator=generator)[: hp.images_per_class]
            chosen.append(indices[pick])
        chosen = torch.cat(chosen)
        random_accuracies.append(accuracy(train_images[chosen], train_labels[chosen]))
    means = torch.stack(
        [train_images[train_labels == label].mean(0) for label in range(hp.num_classes)]
    )
    class_mean = accuracy(means, torch.arange(hp.num_classes))
    full = accuracy(train_images, train_labels)
    metric = {
        "name": "test_accuracy",
        "value": distilled,
        "data": DIGITS_DATA.format(
            seed=data_args.get("seed", 0),
            test=data_args.get("test_size", 300),
            val=data_args.get("val_size", 300),
        ),
        "protocol": f"L2-regularized (l2_reg={hp.l2_reg}) multinomial logistic regression "
        f"trained by Newton on the {module.distilled.shape[0]} distilled images only; top-1 "
        "accuracy on the test split",
    }
    extra = {
        "random_real_images_test_accuracy": sum(random_accuracies) / len(random_accuracies),
        "class_mean_images_test_accuracy": class_mean,
        "full_training_set_test_accuracy": full,
    }
    figure_path = Path("docs/figures/opt-distill-digits.png")
    figure_path.parent.mkdir(parents=True, exist_ok=True)
    distilled_image_grid(module).savefig(figure_path, dpi=100, bbox_inches="tight")
    logger.info("Wrote %s", figure_path)
    return metric, extra


DIGITS_LICENSE = (
    "UCI Optical Recognition of Handwritten Digits test set as bundled with scikit-learn "
    "(scikit-learn is BSD-3-Clause; the UCI Machine Learning Repository sets the data's terms)"
)

EXPORTERS: dict[str, tuple[Callable[[torch.nn.Module, dict], tuple[dict, dict]], str]] = {
    "opt-bilevel-breast-cancer": (
        bilevel_metric,
        "UCI Breast Cancer Wisconsin (Diagnostic) data as bundled with scikit-learn "
        "(scikit-learn is BSD-3-Clause; the UCI Machine Learning Repository sets the data's "
        "terms)",
    ),
    "opt-qpnet-digits": (qpnet_metric, DIGITS_LICENSE),
    "opt-distill-digits": (distillation_metric, DIGITS_LICENSE),
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
