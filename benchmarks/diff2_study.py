"""Compare DIFF2-GD with DP-GD on UCI Adult at equal (epsilon, delta) and rounds.

Problem: binary classification on the one-hot encoded Adult training split with a
107-10-1 softplus MLP and the logistic loss (non-convex in the weights), split into
``--workers`` equal shards. For every number of records ``n`` (the first ``n`` of the
seeded training split), every epsilon and every seed, both methods start from the same
initialisation and run ``--rounds`` rounds with the same step size and restart clip:

* DP-GD (``dpgd``): DIFF2-GD with ``T = 1``, the whole budget on full clipped gradients.
* DIFF2-GD (``diff2``): restart every ``--interval`` rounds, difference clip
  ``L * ||x_r - x_(r-1)||``.
* DIFF2-BVR-L-SGD (``diff2-lvr``, only with ``--methods``): the DIFF2-GD messages, then
  ``--local-steps`` private local steps per worker at Poisson rate ``--local-sample-rate``,
  local clip ``L * ||x_(k+1) - x_k||`` (see :mod:`zoo.privacy.diff2_local`).

All calibrate their noise to ``(epsilon, 1e-5)`` for the run with Opacus' RDP accountant.
The script reports the final full-gradient norm of the mean training loss (exact, without
clipping or noise, on the ``n`` records) and the accuracy on ``adult.test``. Both methods
also run once without noise but with the same clips. These noiseless runs separate the
effect of noise from the effect of clipping.

The workers run one after another in this process (:func:`zoo.privacy.diff2.simulate_diff2`).
They use the same code and noise as the DDP workers of the Lightning module, and a test
checks that both give the same iterates.

Example (the tables and figures of docs/benchmarks.md)::

    ZOO_DATA_DIR=/path/to/data python benchmarks/diff2_study.py \\
        --out docs/figures/diff2-study.json --figures docs/figures

The three-way comparison with the local subroutine::

    ZOO_DATA_DIR=/path/to/data python benchmarks/diff2_study.py \\
        --methods dpgd diff2 diff2-lvr --records 29305 --epsilons 0.5 1 2 --seeds 2 \\
        --out docs/figures/diff2-lvr-study.json --figures docs/figures --figure-prefix diff2-lvr
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from zoo.datamodules.adult import AdultDataModule
from zoo.privacy.diff2 import Diff2, simulate_diff2
from zoo.privacy.diff2_accounting import (
    LocalStepsPrivacy,
    calibrate_noise,
    calibrate_noise_with_local_steps,
    diff2_epsilon,
)
from zoo.privacy.diff2_local import Diff2BVRLocalSGD
from zoo.privacy.diff2_module import build_mlp, summed_logistic_loss

logger = logging.getLogger(__name__)

DELTA = 1e-5

METHODS = ("dpgd", "diff2", "diff2-lvr")
METHOD_NAMES = {"dpgd": "DP-GD", "diff2": "DIFF2-GD", "diff2-lvr": "DIFF2-BVR-L-SGD"}


@dataclass
class StudyRun:
    """Outcome of one method on one (n, epsilon, seed) cell."""

    method: str
    records: int
    epsilon: float
    seed: int
    grad_norm: float
    train_loss: float
    test_accuracy: float
    spent_epsilon: float
    seconds: float


def full_gradient(net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
    """Return the exact gradient norm and value of the mean training loss at ``net``."""
    net.zero_grad()
    loss = summed_logistic_loss(net(inputs), targets) / len(inputs)
    loss.backward()
    norm = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).norm()
    net.zero_grad()
    return float(norm), float(loss.detach())


def run_one(
    method: str,
    epsilon: float | None,
    seed: int,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> StudyRun:
    """Train one method from the seed's initialisation and measure it."""
    inputs, targets = train
    interval = 1 if method == "dpgd" else args.interval
    local: LocalStepsPrivacy | None = None
    if method == "diff2-lvr":
        local = LocalStepsPrivacy(args.local_steps, args.local_sample_rate, 0.0)
    if epsilon is None:
        sigma_restart, sigma_difference, sigma_local = 0.0, 0.0, 0.0
    elif local is not None:
        sigma_restart, sigma_difference, sigma_local = calibrate_noise_with_local_steps(
            epsilon, DELTA, args.rounds, interval, local, local_share=args.local_share
        )
    else:
        sigma_restart, sigma_difference = calibrate_noise(epsilon, DELTA, args.rounds, interval)
        sigma_local = 0.0
    torch.manual_seed(seed)
    net = build_mlp(inputs.shape[1], args.hidden, "softplus").double()
    settings = {
        "lr": args.lr,
        "restart_interval": interval,
        "clip_restart": args.clip,
        "noise_multiplier_restart": sigma_restart,
        "noise_multiplier_difference": sigma_difference,
        "smoothness": args.smoothness if interval > 1 else None,
    }
    algorithm: Diff2
    if local is None:
        algorithm = Diff2(net, summed_logistic_loss, **settings)
    else:
        local = LocalStepsPrivacy(args.local_steps, args.local_sample_rate, sigma_local)
        algorithm = Diff2BVRLocalSGD(
            net,
            summed_logistic_loss,
            local_steps=args.local_steps,
            local_sample_rate=args.local_sample_rate,
            noise_multiplier_local=sigma_local,
            local_smoothness=args.smoothness if args.local_steps > 1 else None,
            **settings,
        )
    shards = [(inputs[p :: args.workers], targets[p :: args.workers]) for p in range(args.workers)]
    start = time.perf_counter()
    simulate_diff2(algorithm, shards, args.rounds, noise_seed=1000 + seed)
    seconds = time.perf_counter() - start
    grad_norm, train_loss = full_gradient(net, inputs, targets)
    with torch.no_grad():
        predictions = (net(test[0]).squeeze(-1) > 0).long()
    accuracy = float((predictions == test[1]).double().mean())
    spent = (
        float("inf")
        if epsilon is None
        else diff2_epsilon(args.rounds, interval, sigma_restart, sigma_difference, DELTA, local)
    )
    return StudyRun(
        method=method,
        records=len(inputs),
        epsilon=float("inf") if epsilon is None else epsilon,
        seed=seed,
        grad_norm=grad_norm,
        train_loss=train_loss,
        test_accuracy=accuracy,
        spent_epsilon=spent,
        seconds=seconds,
    )


def summarise(runs: list[StudyRun]) -> list[dict]:
    """Group runs by (n, epsilon, method) into means and standard deviations over seeds."""
    cells: dict[tuple, list[StudyRun]] = {}
    for run in runs:
        cells.setdefault((run.records, run.epsilon, run.method), []).append(run)
    rows = []
    for (records, epsilon, method), group in sorted(cells.items()):
        norms = [run.grad_norm for run in group]
        accuracies = [run.test_accuracy for run in group]
        rows.append(
            {
                "records": records,
                "epsilon": epsilon,
                "n_epsilon": records * epsilon,
                "method": method,
                "seeds": len(group),
                "grad_norm_median": statistics.median(norms),
                "grad_norm_mean": statistics.fmean(norms),
                "grad_norm_std": statistics.pstdev(norms),
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.pstdev(accuracies),
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Return the per-cell comparison as a Markdown table, DP-GD and DIFF2 side by side."""
    by_cell: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_cell.setdefault((row["records"], row["epsilon"]), {})[row["method"]] = row
    lines = [
        "| n | epsilon | n*epsilon | grad norm DP-GD | grad norm DIFF2 | DP-GD / DIFF2 "
        "| test acc DP-GD | test acc DIFF2 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (records, epsilon), methods in sorted(by_cell.items()):
        if "dpgd" not in methods or "diff2" not in methods:
            continue
        dpgd, diff2 = methods["dpgd"], methods["diff2"]
        ratio = dpgd["grad_norm_median"] / diff2["grad_norm_median"]
        lines.append(
            f"| {records} | {epsilon:g} | {records * epsilon:.0f} "
            f"| {dpgd['grad_norm_median']:.3g} ± {dpgd['grad_norm_std']:.2g} "
            f"| {diff2['grad_norm_median']:.3g} ± {diff2['grad_norm_std']:.2g} "
            f"| {ratio:.2f} "
            f"| {dpgd['accuracy_mean']:.3f} ± {dpgd['accuracy_std']:.3f} "
            f"| {diff2['accuracy_mean']:.3f} ± {diff2['accuracy_std']:.3f} |"
        )
    return "\n".join(lines)


def method_table(rows: list[dict], methods: list[str]) -> str:
    """Return gradient norm and test accuracy of every method per cell as a Markdown table."""
    by_cell: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        by_cell.setdefault((row["records"], row["epsilon"]), {})[row["method"]] = row
    names = [METHOD_NAMES[method] for method in methods]
    header = ["n", "epsilon"]
    header += [f"grad norm {name}" for name in names] + [f"test acc {name}" for name in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for (records, epsilon), cell in sorted(by_cell.items()):
        if not all(method in cell for method in methods) or epsilon == float("inf"):
            continue
        norms = [
            f"{cell[m]['grad_norm_median']:.3g} ± {cell[m]['grad_norm_std']:.2g}" for m in methods
        ]
        accuracies = [
            f"{cell[m]['accuracy_mean']:.3f} ± {cell[m]['accuracy_std']:.3f}" for m in methods
        ]
        lines.append("| " + " | ".join([str(records), f"{epsilon:g}", *norms, *accuracies]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], figures: Path, prefix: str = "diff2") -> list[Path]:
    """Plot gradient norm and test accuracy against n * epsilon; return the PNG paths.

    The files are ``<prefix>-grad-norm.png`` and ``<prefix>-accuracy.png`` in ``figures``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [
        ("grad_norm_median", "final full-gradient norm (median over seeds)", "grad-norm"),
        ("accuracy_mean", "test accuracy (mean over seeds)", "accuracy"),
    ]
    private = [row for row in rows if row["epsilon"] != float("inf")]
    for key, label, stem in panels:
        figure, axis = plt.subplots(figsize=(6, 4))
        for records in sorted({row["records"] for row in private}):
            for method, style in (("dpgd", "o--"), ("diff2", "s-"), ("diff2-lvr", "^-.")):
                points = sorted(
                    (row["n_epsilon"], row[key])
                    for row in private
                    if row["records"] == records and row["method"] == method
                )
                if points:
                    xs, ys = zip(*points, strict=True)
                    axis.plot(xs, ys, style, label=f"{METHOD_NAMES[method]}, n={records}")
        axis.set_xscale("log")
        if key.startswith("grad"):
            axis.set_yscale("log")
        axis.set_xlabel("n * epsilon")
        axis.set_ylabel(label)
        axis.set_title("UCI Adult, 107-10-1 softplus MLP, delta=1e-5")
        axis.legend(fontsize=7)
        path = figures / f"{prefix}-{stem}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default=None, help="folder that contains adult/uci/ (default: $ZOO_DATA_DIR)"
    )
    parser.add_argument("--records", type=int, nargs="+", default=[2000, 29305])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell")
    parser.add_argument("--rounds", type=int, default=50, help="rounds R of both methods")
    parser.add_argument("--interval", type=int, default=10, help="DIFF2 restart interval T")
    parser.add_argument("--lr", type=float, default=2.0, help="step size of both methods")
    parser.add_argument("--clip", type=float, default=1.0, help="restart clip C1")
    parser.add_argument("--smoothness", type=float, default=0.3, help="DIFF2 L")
    parser.add_argument("--hidden", type=int, nargs="+", default=[10], help="hidden widths")
    parser.add_argument("--workers", type=int, default=4, help="simulated workers P")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=["dpgd", "diff2"],
        help="methods to compare (dpgd, diff2, diff2-lvr)",
    )
    parser.add_argument(
        "--local-steps", type=int, default=3, help="DIFF2-BVR-L-SGD local steps K per round"
    )
    parser.add_argument(
        "--local-sample-rate",
        type=float,
        default=0.02,
        help="DIFF2-BVR-L-SGD Poisson sampling rate q of a local minibatch on a worker's shard",
    )
    parser.add_argument(
        "--local-share",
        type=float,
        default=0.5,
        help="DIFF2-BVR-L-SGD approximate share of the budget spent on local steps",
    )
    parser.add_argument(
        "--figure-prefix", default="diff2", help="file name prefix of the PNGs in --figures"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file for all runs")
    parser.add_argument("--figures", type=Path, default=None, help="folder for the PNGs")
    args = parser.parse_args(argv)
    for name in ("seeds", "rounds", "interval", "workers", "local_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.local_sample_rate <= 1.0:
        parser.error(f"--local-sample-rate must be in (0, 1], got {args.local_sample_rate}")
    if not 0.0 < args.local_share < 1.0:
        parser.error(f"--local-share must be in (0, 1), got {args.local_share}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the sweep, print the table and write the JSON and figures."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args = parse_args(argv)
    torch.set_num_threads(1)
    data = AdultDataModule(data_dir=args.data_dir, batch_size=-1)
    data.setup()
    all_inputs, all_labels = data.train_tensors()
    test_inputs, test_labels = data.test_set.tensors
    test = (test_inputs.to(torch.float64), test_labels)
    for records in args.records:
        if not 1 <= records <= len(all_inputs):
            raise ValueError(
                f"--records {records} is outside [1, {len(all_inputs)}], the training split."
            )

    runs: list[StudyRun] = []
    start = time.perf_counter()
    for records in args.records:
        train = (all_inputs[:records].to(torch.float64), all_labels[:records].to(torch.float64))
        for method in args.methods:
            noiseless = run_one(method, None, 0, train, test, args)
            noiseless.method = f"{method}-noiseless"
            runs.append(noiseless)
        for epsilon in args.epsilons:
            for seed in range(args.seeds):
                for method in args.methods:
                    run = run_one(method, epsilon, seed, train, test, args)
                    runs.append(run)
                    logger.info(
                        "n=%d eps=%g seed=%d %s: grad norm %.4g, test accuracy %.4f (%.1f s)",
                        records,
                        epsilon,
                        seed,
                        method,
                        run.grad_norm,
                        run.test_accuracy,
                        time.perf_counter() - start,
                    )

    rows = summarise(runs)
    if args.methods == ["dpgd", "diff2"]:
        print(markdown_table(rows))
    else:
        print(method_table(rows, args.methods))
    for run in runs:
        if run.method.endswith("-noiseless"):
            print(
                f"{run.method} (no noise, same clips), n={run.records}: grad norm "
                f"{run.grad_norm:.4g}, test accuracy {run.test_accuracy:.4f}"
            )
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        paths = ("data_dir", "out", "figures")
        settings = {key: value for key, value in vars(args).items() if key not in paths}
        payload = {"settings": settings, "runs": [asdict(run) for run in runs], "cells": rows}
        args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if args.figures is not None:
        for path in plot(rows, args.figures, args.figure_prefix):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
