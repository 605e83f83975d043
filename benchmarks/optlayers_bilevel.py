"""Compare implicit hypergradients with unrolled differentiation and grid search.

Task: tune the L2 regularization of logistic regression on scikit-learn's breast-cancer
data (the split of ``BreastCancerBilevelDataModule``: 150 inner training, 200 validation,
219 test samples). Three tuners:

- grid search over one shared log-regularization strength (41 values in [-8, 2]);
- per-feature strengths (30) by Adam on the validation loss, with implicit hypergradients
  through a Newton inner solver;
- the same with hypergradients from backpropagation through unrolled gradient descent.

Every tuned setting is evaluated with the inner problem solved to optimality (Newton), so the
reported losses compare hyperparameters, not inner solvers. A second table measures one
hypergradient computation as the inner iteration count grows, with gradient descent as the
inner solver in both modes. It reports wall time, the bytes that autograd saves for the
backward pass, and the error against the exact hypergradient. Run from the repository root::

    python benchmarks/optlayers_bilevel.py --outer-steps 100 --json bilevel.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
import torch.nn.functional as F

from zoo.datamodules.breast_cancer import BreastCancerBilevelDataModule
from zoo.optlayers.logistic import (
    add_intercept,
    fit_gradient_descent,
    fit_newton,
    solve_implicit,
)

logger = logging.getLogger("optlayers_bilevel_benchmark")


def evaluate(log_reg: torch.Tensor, splits: dict) -> dict:
    """Fit the inner problem to optimality and return validation and test loss and accuracy."""
    design = add_intercept(splits["inner"][0])
    weights = fit_newton(log_reg, design, splits["inner"][1], maxiter=100)
    result = {}
    for name in ("val", "test"):
        features, labels = splits[name]
        logits = add_intercept(features) @ weights
        result[f"{name}_loss"] = F.binary_cross_entropy_with_logits(logits, labels).item()
        result[f"{name}_accuracy"] = ((logits > 0).double() == labels).double().mean().item()
    return result


def grid_search(splits: dict, num_values: int) -> dict:
    start = time.perf_counter()
    best = None
    for value in torch.linspace(-8.0, 2.0, num_values).tolist():
        log_reg = torch.full((splits["inner"][0].shape[1],), value, dtype=torch.float64)
        metrics = evaluate(log_reg, splits)
        if best is None or metrics["val_loss"] < best[1]["val_loss"]:
            best = (value, metrics)
    return {"seconds": time.perf_counter() - start, "log_reg": best[0], **best[1]}


def tune(splits: dict, mode: str, outer_steps: int, inner_steps: int, lr: float) -> dict:
    """Adam on per-feature log-regularization with implicit or unrolled hypergradients."""
    inner_design = add_intercept(splits["inner"][0])
    inner_labels = splits["inner"][1]
    val_design = add_intercept(splits["val"][0])
    val_labels = splits["val"][1]
    log_reg = torch.zeros(inner_design.shape[1] - 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([log_reg], lr=lr)
    start = time.perf_counter()
    for _ in range(outer_steps):
        optimizer.zero_grad()
        if mode == "implicit":
            weights = solve_implicit(log_reg, inner_design, inner_labels)
        else:
            weights = fit_gradient_descent(log_reg, inner_design, inner_labels, inner_steps)
        loss = F.binary_cross_entropy_with_logits(val_design @ weights, val_labels)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, **evaluate(log_reg.detach(), splits)}


def saved_tensor_bytes(compute, data: list[torch.Tensor]) -> tuple[int, object]:
    """Run ``compute`` and return the bytes of distinct tensors autograd saved meanwhile.

    Counts every tensor packed for a backward pass (forward graph and the implicit backward's
    own small graph alike), deduplicated by storage. Storages of the ``data`` tensors exist
    before and after the computation, so they are not counted.
    """
    data_pointers = {tensor.untyped_storage().data_ptr() for tensor in data}
    seen: dict[tuple[int, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in data_pointers:
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = compute()
    return sum(seen.values()), result


def hypergradient_scaling(splits: dict, counts: list[int], repeats: int) -> list[dict]:
    inner_design = add_intercept(splits["inner"][0])
    inner_labels = splits["inner"][1]
    val_design = add_intercept(splits["val"][0])
    val_labels = splits["val"][1]
    log_reg_value = torch.full((inner_design.shape[1] - 1,), -2.0, dtype=torch.float64)

    def hypergradient(mode: str, count: int) -> torch.Tensor:
        log_reg = log_reg_value.clone().requires_grad_()
        if mode == "implicit":
            weights = solve_implicit(
                log_reg,
                inner_design,
                inner_labels,
                inner_solver="gradient_descent",
                num_steps=count,
            )
        elif mode == "unrolled":
            weights = fit_gradient_descent(log_reg, inner_design, inner_labels, count)
        else:
            weights = solve_implicit(log_reg, inner_design, inner_labels, linear_solver="dense")
        loss = F.binary_cross_entropy_with_logits(val_design @ weights, val_labels)
        (gradient,) = torch.autograd.grad(loss, log_reg)
        return gradient

    exact = hypergradient("exact", 0)
    rows = []
    for count in counts:
        row: dict = {"inner_iterations": count}
        for mode in ("implicit", "unrolled"):
            memory, gradient = saved_tensor_bytes(
                lambda mode=mode, count=count: hypergradient(mode, count),
                [inner_design, inner_labels, val_design, val_labels],
            )
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                hypergradient(mode, count)
                times.append(time.perf_counter() - start)
            row[f"{mode}_seconds"] = statistics.median(times)
            row[f"{mode}_saved_bytes"] = memory
            row[f"{mode}_relative_error"] = ((gradient - exact).norm() / exact.norm()).item()
        row["memory_ratio_unrolled_over_implicit"] = (
            row["unrolled_saved_bytes"] / row["implicit_saved_bytes"]
        )
        row["time_ratio_unrolled_over_implicit"] = row["unrolled_seconds"] / row["implicit_seconds"]
        rows.append(row)
        logger.info(json.dumps(row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-steps", type=int, default=100, help="Adam steps per tuner")
    parser.add_argument("--unrolled-steps", type=int, default=100, help="unrolled GD steps")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    parser.add_argument("--grid", type=int, default=41, help="grid-search values")
    parser.add_argument(
        "--counts", type=int, nargs="+", default=[10, 30, 100, 300, 1000], help="inner iterations"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    for name in ("outer_steps", "unrolled_steps", "grid", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    datamodule = BreastCancerBilevelDataModule()
    datamodule.setup()
    splits = datamodule.splits
    initial = evaluate(torch.zeros(30, dtype=torch.float64), splits)
    logger.info("initial (log_reg = 0): %s", json.dumps(initial))
    results: dict = {"initial": initial}
    results["grid_search"] = grid_search(splits, args.grid)
    logger.info("grid search: %s", json.dumps(results["grid_search"]))
    results["implicit"] = tune(splits, "implicit", args.outer_steps, 0, args.lr)
    logger.info("implicit: %s", json.dumps(results["implicit"]))
    results["unrolled"] = tune(splits, "unrolled", args.outer_steps, args.unrolled_steps, args.lr)
    logger.info("unrolled (%d GD steps): %s", args.unrolled_steps, json.dumps(results["unrolled"]))
    results["scaling"] = hypergradient_scaling(splits, args.counts, args.repeats)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
