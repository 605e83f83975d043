"""Sample-complexity study of the layerwise three-layer network against two baselines.

Runs test error against n for several d, for the layerwise method, random-feature ridge
and a two-layer network trained end to end, averaged over seeds. Then it prints the
Markdown table, estimates n*(d) (the n at which the mean normalised test MSE reaches
--threshold) and the exponent of n* ~ d^alpha, saves the log-log figure and logs the
figure and the exponents to a CSV logger and an offline Weights & Biases run.

Resumable: each finished cell is appended to --results, and a rerun skips those cells.

    python benchmarks/polynomials_sample_complexity.py
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from zoo.polynomials.study import (
    METHOD_LABELS,
    StudySettings,
    fit_scaling_exponent,
    plot_study,
    run_study,
    summarize,
    threshold_sample_sizes,
)

logger = logging.getLogger("polynomials_sample_complexity")

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 12, 16], help="input dims d")
    parser.add_argument(
        "--sample-sizes",
        type=int,
        nargs="+",
        default=[1024, 2048, 4096, 8192, 16384, 32768],
        help="training sample sizes n",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["layerwise", "random_features", "two_layer"],
        help="methods to run",
    )
    parser.add_argument("--feature-degree", type=int, default=2, help="degree k of p")
    parser.add_argument(
        "--link",
        type=float,
        nargs="+",
        default=[0.0, 1.0, 0.0, 1.0],
        help="Hermite coefficients c_0 .. c_q of the link g",
    )
    parser.add_argument(
        "--threshold", type=float, default=0.25, help="normalised test MSE that defines n*"
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO_ROOT / "benchmarks" / "polynomials_sample_complexity.jsonl",
        help="JSON-lines file of finished cells (appended to; rerun to resume)",
    )
    parser.add_argument(
        "--figure",
        type=Path,
        default=REPO_ROOT / "docs" / "figures" / "poly-sample-complexity.png",
        help="where to save the log-log plot",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=REPO_ROOT / "runs" / "poly-sample-complexity",
        help="folder of the CSV and Weights & Biases logs",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def format_table(rows: list[dict]) -> str:
    lines = [
        "| d | n | method | seeds | test NMSE (mean ± std) | stage-1 corr(feature, p) |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["d"], r["n"], r["method"])):
        corr = row.get("feature_corr_mean")
        lines.append(
            f"| {row['d']} | {row['n']} | {METHOD_LABELS[row['method']]} | {row['seeds']} | "
            f"{row['nmse_mean']:.3f} ± {row['nmse_std']:.3f} | "
            f"{'' if corr is None else f'{corr:.3f}'} |"
        )
    return "\n".join(lines)


def log_outputs(log_dir: Path, figure, metrics: dict[str, float]) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from PIL import Image

    log_dir.mkdir(parents=True, exist_ok=True)
    csv_logger = CSVLogger(save_dir=str(log_dir), name="csv")
    csv_logger.log_metrics(metrics)
    csv_logger.save()
    if os.environ.get("WANDB_MODE", "offline").lower() == "disabled":
        return
    wandb_logger = WandbLogger(
        save_dir=str(log_dir), project="zoo", name="poly-sample-complexity", offline=True
    )
    wandb_logger.log_metrics(metrics)
    figure.canvas.draw()
    image = Image.frombuffer("RGBA", figure.canvas.get_width_height(), figure.canvas.buffer_rgba())
    wandb_logger.log_image(key="sample_complexity", images=[image.convert("RGB")])
    wandb_logger.experiment.finish()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    settings = StudySettings(feature_degree=args.feature_degree, link_coefficients=tuple(args.link))
    records = run_study(
        args.results, args.dims, args.sample_sizes, args.seeds, args.methods, settings
    )
    requested = {(m, d, n) for m in args.methods for d in args.dims for n in args.sample_sizes}
    rows = [r for r in summarize(records) if (r["method"], r["d"], r["n"]) in requested]
    print(format_table(rows))

    estimates = threshold_sample_sizes(rows, args.threshold)
    metrics: dict[str, float] = {}
    print(f"\nn* = smallest n with mean test NMSE <= {args.threshold} (interpolated):")
    for method in args.methods:
        by_dim = {d: estimates.get((method, d)) for d in args.dims}
        formatted = ", ".join(
            f"d={d}: {'not reached' if n is None else f'{n:.0f}'}" for d, n in by_dim.items()
        )
        print(f"  {METHOD_LABELS[method]}: {formatted}")
        reached = {d: n for d, n in by_dim.items() if n is not None}
        for d, n in reached.items():
            metrics[f"{method}/n_star_d{d}"] = n
        if len(reached) >= 2:
            exponent = fit_scaling_exponent(reached)
            metrics[f"{method}/exponent"] = exponent
            print(f"    fitted n* ~ d^{exponent:.2f} over d = {sorted(reached)}")

    figure = plot_study(rows, threshold=args.threshold)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=120, bbox_inches="tight")
    print(f"\nFigure: {args.figure}")
    log_outputs(args.log_dir, figure, metrics)


if __name__ == "__main__":
    main()
