"""Time zoo.ode.solver.solve_ivp against torchdiffeq's dopri5 on the same problem, in one run.

Problem: a 32-64-32 tanh MLP vector field, a batch of 128 random initial states, t from 0 to 1,
rtol=1e-5, atol=1e-6. Every solver runs once per round and the rounds repeat, so that load from
other processes hits all solvers alike. Times are CPU time of the calling thread
(``time.thread_time`` with ``torch.set_num_threads(1)`` by default), which excludes the time
the process waits for a core on a shared machine. For each solver the script reports the
median time per attempted step, the NFE, and the share of the solve spent outside the vector
field, measured by timing every vector-field call inside the solve. Ratios are torchdiffeq's
time (per step or per solve) divided by the zoo solver's.

Example::

    python benchmarks/ode_solver_vs_torchdiffeq.py --rounds 40 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchdiffeq import odeint

from zoo.ode.solver import solve_ivp

logger = logging.getLogger("ode_solver_vs_torchdiffeq")


class TimedMLP(nn.Module):
    """The 32-64-32 tanh MLP vector field, counting calls and the time spent in them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        self.calls = 0
        self.seconds = 0.0

    def reset(self) -> None:
        """Zero the call counter and the timer."""
        self.calls = 0
        self.seconds = 0.0

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        """Evaluate ``dy/dt`` (autonomous: ``t`` is ignored)."""
        start = time.thread_time()
        out = self.net(y)
        self.seconds += time.thread_time() - start
        self.calls += 1
        return out


@dataclass
class Measurements:
    """Per-round measurements of one solver."""

    seconds_per_solve: list[float] = field(default_factory=list)
    seconds_per_step: list[float] = field(default_factory=list)
    outside_share: list[float] = field(default_factory=list)
    nfe: int = 0
    steps: int = 0


def run_torchdiffeq(f: TimedMLP, y0: Tensor, t: Tensor, rtol: float, atol: float) -> Tensor:
    return odeint(f, y0, t, rtol=rtol, atol=atol, method="dopri5")[-1]


def make_zoo_runner(method: str, per_sample_steps: bool) -> Callable[..., Tensor]:
    def run(f: TimedMLP, y0: Tensor, t: Tensor, rtol: float, atol: float) -> Tensor:
        solution = solve_ivp(
            f, y0, t, method=method, rtol=rtol, atol=atol, per_sample_steps=per_sample_steps
        )
        return solution.ys[-1]

    return run


def measure(args: argparse.Namespace) -> dict[str, Measurements]:
    """Run every solver ``args.rounds`` times, interleaved, and collect the measurements."""
    torch.manual_seed(0)
    f = TimedMLP(args.dim, args.hidden)
    y0 = torch.randn(args.batch, args.dim)
    t = torch.tensor([0.0, args.t1])
    solvers: dict[str, Callable[..., Tensor]] = {
        "torchdiffeq dopri5": run_torchdiffeq,
        "zoo dopri5, shared step": make_zoo_runner("dopri5", False),
        "zoo dopri5, per-sample steps": make_zoo_runner("dopri5", True),
        "zoo tsit5, shared step": make_zoo_runner("tsit5", False),
        "zoo tsit5, per-sample steps": make_zoo_runner("tsit5", True),
    }
    results = {name: Measurements() for name in solvers}
    for round_index in range(args.rounds + args.warmup):
        for name, run in solvers.items():
            f.reset()
            f.zero_grad(set_to_none=True)
            start = time.thread_time()
            with torch.set_grad_enabled(args.mode != "inference"):
                out = run(f, y0, t, args.rtol, args.atol)
                if args.mode == "train":
                    out.square().mean().backward()
            seconds = time.thread_time() - start
            if round_index < args.warmup:
                continue
            # Both solvers spend 2 evaluations on the first step and 6 per attempted step.
            steps = (f.calls - 2) // 6
            record = results[name]
            record.nfe = f.calls
            record.steps = steps
            record.seconds_per_solve.append(seconds)
            record.seconds_per_step.append(seconds / steps)
            record.outside_share.append(1.0 - f.seconds / seconds)
    return results


def format_table(results: dict[str, Measurements], mode: str) -> str:
    """Format a Markdown table of the medians, with ratios against torchdiffeq."""
    reference = results["torchdiffeq dopri5"]
    reference_step = statistics.median(reference.seconds_per_step)
    reference_solve = statistics.median(reference.seconds_per_solve)
    lines = [
        f"mode: {mode}",
        "",
        "| solver | NFE | steps | time per step (ms) | speed-up per step vs torchdiffeq "
        "| time per solve (ms) | speed-up per solve | time outside vector field |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, record in results.items():
        per_step = statistics.median(record.seconds_per_step)
        per_solve = statistics.median(record.seconds_per_solve)
        outside = statistics.median(record.outside_share)
        lines.append(
            f"| {name} | {record.nfe} | {record.steps} | {per_step * 1e3:.3f} | "
            f"{reference_step / per_step:.2f}x | {per_solve * 1e3:.2f} | "
            f"{reference_solve / per_solve:.2f}x | {outside * 100:.0f}% |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="Batch size (default 128).")
    parser.add_argument("--dim", type=int, default=32, help="State size (default 32).")
    parser.add_argument("--hidden", type=int, default=64, help="Hidden width (default 64).")
    parser.add_argument("--t1", type=float, default=1.0, help="End time (default 1.0).")
    parser.add_argument("--rtol", type=float, default=1e-5, help="Relative tolerance.")
    parser.add_argument("--atol", type=float, default=1e-6, help="Absolute tolerance.")
    parser.add_argument("--rounds", type=int, default=40, help="Timed rounds (default 40).")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed rounds (default 3).")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads value (default 1)."
    )
    parser.add_argument(
        "--mode",
        choices=["forward", "inference", "train"],
        nargs="+",
        default=["forward", "inference", "train"],
        help="forward: autograd graph built, as in training without the backward pass; "
        "inference: under torch.no_grad; train: solve plus backward pass.",
    )
    args = parser.parse_args()

    for name in ("batch", "dim", "hidden", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid; use an integer >= 1.")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} is invalid; use an integer >= 0.")
    for name in ("t1", "rtol", "atol"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name}={getattr(args, name)} is invalid; use a number > 0.")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    logger.info(
        "torch %s, %d thread(s), batch %d, MLP %d-%d-%d, rtol %g, atol %g, %d rounds",
        torch.__version__,
        args.threads,
        args.batch,
        args.dim,
        args.hidden,
        args.dim,
        args.rtol,
        args.atol,
        args.rounds,
    )
    for mode in args.mode:
        run_args = argparse.Namespace(**{**vars(args), "mode": mode})
        logger.info("%s\n", format_table(measure(run_args), mode))


if __name__ == "__main__":
    main()
