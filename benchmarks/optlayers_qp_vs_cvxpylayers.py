"""Time forward + backward of the zoo's QPLayer against cvxpylayers on one batch of dense QPs.

Both layers solve the same batch of ``min ½||L x||² + qᵀx s.t. Gx <= h`` with parameters ``L``
(the Cholesky factor of a positive-definite matrix) and ``q``, and backpropagate the sum of
the solutions. The script reports each layer's median time per call, their ratio, and the
largest differences between their solutions and gradients. Run from the repository root::

    python benchmarks/optlayers_qp_vs_cvxpylayers.py --batch 64 --n 20 --m 10 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import cvxpy as cp
import numpy as np
import torch

from zoo.optlayers import QPLayer
from zoo.optlayers.cvxpy_layer import ConvexLayer

logger = logging.getLogger("optlayers_qp_benchmark")


def build_problem(batch: int, n: int, m: int, seed: int):
    """Return the shared data: Cholesky factors (batch, n, n), q (batch, n), G (m, n), h (m)."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((m, n))
    h = np.ones(m)
    factor = rng.standard_normal((n, n))
    P = factor @ factor.T + np.eye(n)
    L = torch.tensor(np.linalg.cholesky(P).T).repeat(batch, 1, 1)
    L = L + 0.01 * torch.randn(
        batch, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    q = torch.randn(
        batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)
    )
    return L, q, torch.tensor(G), torch.tensor(h)


def time_interleaved(steps: dict, repeats: int) -> tuple[dict, dict]:
    """Warm up each step once, then time them in turn ``repeats`` times (A, B, C, A, B, C, ...).

    Interleaving exposes every step to the same background load on a shared machine.
    Returns the median seconds and the last result of each step.
    """
    results = {name: step() for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            results[name] = step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, results


def max_error(result, reference) -> dict:
    """Largest absolute differences of solution and gradients from the reference."""
    names = ("x", "grad_L", "grad_q")
    return {
        name: (a - b).abs().max().item()
        for name, a, b in zip(names, result, reference, strict=True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="number of QPs in the batch")
    parser.add_argument("--n", type=int, default=20, help="number of variables per QP")
    parser.add_argument("--m", type=int, default=10, help="number of inequality constraints")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per layer")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--qp-tol", type=float, default=1e-12, help="QPLayer KKT tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    for name in ("batch", "n", "m", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    L, q, G, h = build_problem(args.batch, args.n, args.m, args.seed)
    x_var = cp.Variable(args.n)
    L_param = cp.Parameter((args.n, args.n))
    q_param = cp.Parameter(args.n)
    problem = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares(L_param @ x_var) + q_param @ x_var),
        [G.numpy() @ x_var <= h.numpy()],
    )
    default_layer = ConvexLayer(problem, [L_param, q_param], [x_var])
    tight_layer = ConvexLayer(problem, [L_param, q_param], [x_var], solver_args={"eps": 1e-8})
    reference_layer = ConvexLayer(problem, [L_param, q_param], [x_var], solver_args={"eps": 1e-11})
    ours = QPLayer(tol=args.qp_tol)

    def make_step(layer):
        def step():
            L_in = L.clone().requires_grad_()
            q_in = q.clone().requires_grad_()
            if isinstance(layer, QPLayer):
                x = layer(L_in.transpose(-1, -2) @ L_in, q_in, G, h)
            else:
                (x,) = layer(L_in, q_in)
            x.sum().backward()
            return x.detach(), L_in.grad, q_in.grad

        return step

    reference = make_step(reference_layer)()
    steps = {
        "qplayer": make_step(ours),
        "cvxpylayers_default": make_step(default_layer),
        "cvxpylayers_eps1e-8": make_step(tight_layer),
    }
    seconds, outputs = time_interleaved(steps, args.repeats)
    results: dict = {"batch": args.batch, "n": args.n, "m": args.m, "threads": args.threads}
    for name in steps:
        results[name] = {
            "seconds": seconds[name],
            "speedup_of_qplayer": seconds[name] / seconds["qplayer"],
            "max_abs_error": max_error(outputs[name], reference),
        }
    results["qplayer_iterations"] = ours.last_solution.iterations
    results["qplayer_all_converged"] = bool(ours.last_solution.converged.all())
    results["reference"] = "cvxpylayers with SCS eps=1e-11"
    logger.info(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
