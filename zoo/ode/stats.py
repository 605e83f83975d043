"""Plain-number summaries of ODE solves, for logging."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zoo.ode.block import ODEBlockOutput


def solve_statistics(output: ODEBlockOutput) -> dict[str, float]:
    """Summarize one solve as floats: NFE, accepted and rejected steps, penalty terms.

    Penalty terms are stored under ``"reg/<name>"`` (``"reg/total"`` among them), detached
    from the graph.
    """
    stats = output.stats
    summary = {
        "nfe": float(stats.nfe),
        "n_accepted": float(stats.n_accepted),
        "n_rejected": float(stats.n_rejected),
    }
    for name, value in output.terms.items():
        summary[f"reg/{name}"] = float(value.detach())
    return summary
