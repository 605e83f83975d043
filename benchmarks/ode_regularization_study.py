"""Compare unregularized, ERNODE and SRNODE neural ODEs trained with one seed and budget.

For each variant the script trains the registered model with the same seed, data subset
and number of epochs, in one process one after another, and then measures on the test
set: accuracy (classifier) or mean squared error (latent ODE), the mean NFE per test
batch and the wall time of predicting the whole test set. Training cost is reported both
as wall time and as the sum of the forward NFE over all training batches, which does not
depend on the load of a shared machine. Ratios against the unregularized model are
printed as a Markdown table and saved as JSON.

Example (the MNIST table of docs/benchmarks.md)::

    python benchmarks/ode_regularization_study.py --task mnist --data-dir "$ZOO_DATA_DIR" \\
        --epochs 3 --subset 10000 --out docs/benchmarks/ode-mnist-study.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from zoo import hub
from zoo.callbacks.ode_stats import ODEStatsCallback

logger = logging.getLogger(__name__)

TASKS = {
    "mnist": ["ode-mnist", "ode-mnist-ernode", "ode-mnist-srnode"],
    "mocap": ["ode-mocap", "ode-mocap-ernode", "ode-mocap-srnode"],
    "digits": ["ode-digits", "ode-digits-ernode", "ode-digits-srnode"],
}


def build_from_config(
    name: str,
    data_dir: str | None,
    data_overrides: dict[str, Any],
    model_overrides: dict[str, Any],
) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """Instantiate the model and datamodule of the registered config ``name``."""
    config = hub.load_config(name)
    model = hub.create_model(name, **model_overrides)
    data_section = config["data"]
    data_class = hub.import_class(data_section["class_path"])
    data_args = dict(data_section.get("init_args") or {})
    data_args.update(data_overrides)
    if data_dir is not None:
        data_args["data_dir"] = data_dir
    return model, data_class(**data_args)


class TrainingNFECounter(pl.Callback):
    """Sum the forward NFE of every training batch, a load-independent training cost."""

    def __init__(self) -> None:
        self.total = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args):
        self.total += pl_module.ode_stats.get("nfe", 0.0)


@torch.no_grad()
def evaluate(model: pl.LightningModule, batches: list[Any]) -> dict[str, float]:
    """Predict every test batch; return the metric and the mean NFE per batch."""
    model.eval()
    is_classifier = len(batches[0]) == 2
    count = 0
    total = 0.0
    nfe: list[float] = []
    for batch in batches:
        if is_classifier:
            images, labels = batch
            total += float((model(images).argmax(dim=-1) == labels).sum())
            count += len(labels)
        else:
            values = batch[0]
            reconstruction = model(*batch)
            total += float((reconstruction - values).pow(2).mean(dim=(1, 2)).sum())
            count += len(values)
        nfe.append(model.ode_stats["nfe"])
    result = {"nfe": sum(nfe) / len(nfe), "test_examples": count}
    result["accuracy" if is_classifier else "mse"] = total / count
    return result


@torch.no_grad()
def time_predictions(models: list[pl.LightningModule], batches: list[list[Any]], repeats: int):
    """Return the fastest of ``repeats`` timed test passes of each model.

    The models take turns within every round, so that load from other processes on a
    shared machine affects all of them alike.
    """
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for index, (model, model_batches) in enumerate(zip(models, batches, strict=True)):
            model.eval()
            is_classifier = len(model_batches[0]) == 2
            start = time.perf_counter()
            for batch in model_batches:
                model(*(batch[:1] if is_classifier else batch))
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def run_variant(
    name: str, args: argparse.Namespace
) -> tuple[dict[str, Any], pl.LightningModule, list[Any]]:
    """Train and evaluate one registered model; return its row, the model and test batches."""
    pl.seed_everything(args.seed, workers=True)
    overrides: dict[str, Any] = {}
    if args.subset is not None:
        overrides["subset"] = args.subset
    if args.val_size is not None:
        overrides["val_size"] = args.val_size
    model, data = build_from_config(name, args.data_dir, overrides, args.model_overrides)
    counter = TrainingNFECounter()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=args.limit_val_batches,
        num_sanity_val_steps=0,
        callbacks=[counter],
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    train_seconds = time.perf_counter() - start
    data.setup("test")
    batches = list(data.test_dataloader())
    row = {
        "model": name,
        "train_seconds": train_seconds,
        "train_nfe": counter.total,
        **evaluate(model, batches),
    }
    history = [
        callback.history["train"]
        for callback in trainer.callbacks
        if isinstance(callback, ODEStatsCallback)
    ]
    row["train_nfe_per_epoch"] = [nfe for _, nfe in history[0]] if history else []
    logger.info("%s: %s", name, row)
    if args.export_dir and name.endswith("-ernode"):
        export(model, name, row, args, dict(data.hparams))
    return row, model, batches


def export(
    model: pl.LightningModule,
    name: str,
    row: dict[str, Any],
    args: argparse.Namespace,
    data_args: dict[str, Any],
) -> None:
    """Export the trained ERNODE model as a pretrained checkpoint with its test metric."""
    if "accuracy" in row:
        metric = {
            "name": "test_accuracy",
            "value": row["accuracy"],
            "data": f"{args.task} test split ({row['test_examples']} examples)",
            "protocol": (
                f"{args.epochs} epochs on {data_args.get('subset') or 'all'} training images, "
                f"seed {args.seed}, test batches of {data_args.get('batch_size')}"
            ),
        }
        license_text = "MNIST: CC BY-SA 3.0 (LeCun, Cortes, Burges)"
        if args.task == "digits":
            license_text = "UCI optical digits via scikit-learn: CC BY 4.0"
    else:
        metric = {
            "name": "test_mse",
            "value": row["mse"],
            "data": f"CMU mocap subject 35 walking, test split ({row['test_examples']} windows)",
            "protocol": f"{args.epochs} epochs, seed {args.seed}",
        }
        license_text = "CMU Graphics Lab Motion Capture Database (free use, no resale)"
    extra = {"test_nfe": row["nfe"]}
    hub.export_pretrained(
        model,
        name,
        model=name,
        metric=metric,
        data_license=license_text,
        extra=extra,
        out_dir=args.export_dir,
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """Return a Markdown table with ratios against the first (unregularized) row."""
    base = rows[0]
    metric = "accuracy" if "accuracy" in base else "mse"
    lines = [
        f"| model | test {metric} | test NFE per batch (ratio) | prediction s (ratio) | "
        "training NFE (ratio) | training s (ratio) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["model"],
            f"{row[metric]:.4f}",
            f"{row['nfe']:.1f} ({row['nfe'] / base['nfe']:.2f})",
            f"{row['predict_seconds']:.2f} "
            f"({row['predict_seconds'] / base['predict_seconds']:.2f})",
            f"{row['train_nfe']:.0f} ({row['train_nfe'] / base['train_nfe']:.2f})",
            f"{row['train_seconds']:.1f} ({row['train_seconds'] / base['train_seconds']:.2f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_nfe_per_epoch(rows: list[dict[str, Any]], path: Path) -> None:
    """Save a figure of the mean training NFE per batch in every epoch, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for row in rows:
        values = row["train_nfe_per_epoch"]
        axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=row["model"])
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("mean training NFE per batch")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="mnist")
    parser.add_argument("--models", nargs="+", help="registered models (default: the task's)")
    parser.add_argument("--data-dir", help="data root (default: $ZOO_DATA_DIR)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per model")
    parser.add_argument("--subset", type=int, help="MNIST training examples (default: config)")
    parser.add_argument("--val-size", type=int, help="MNIST validation examples")
    parser.add_argument("--limit-val-batches", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--predict-repeats", type=int, default=3, help="timed test passes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--export-dir", help="export the ERNODE model as pretrained here")
    parser.add_argument("--figure", type=Path, help="save a PNG of training NFE per epoch")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model constructor argument of every model; VALUE is parsed as YAML",
    )
    args = parser.parse_args(argv)
    args.model_overrides = {}
    for item in args.set:
        key, separator, value = item.partition("=")
        if not separator or not key:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        args.model_overrides[key] = yaml.safe_load(value)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models or TASKS[args.task]
    results = [run_variant(name, args) for name in names]
    rows = [row for row, _, _ in results]
    seconds = time_predictions(
        [model for _, model, _ in results],
        [batches for _, _, batches in results],
        args.predict_repeats,
    )
    for row, value in zip(rows, seconds, strict=True):
        row["predict_seconds"] = value
    table = format_table(rows)
    logger.info("\n%s", table)
    if args.figure:
        plot_nfe_per_epoch(rows, args.figure)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
