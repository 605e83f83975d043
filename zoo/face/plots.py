"""Figures for face verification."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor
from torchmetrics.functional.classification import binary_roc

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def roc_figure(scores: Tensor, is_same: Tensor, metrics: dict[str, float]) -> Figure:
    """Plot the verification ROC curve (TAR against FAR, log-scaled FAR axis)."""
    from matplotlib.figure import Figure

    fpr, tpr, _ = binary_roc(scores.detach().cpu().float(), is_same.detach().cpu().long())
    figure = Figure(figsize=(4.5, 4))
    axes = figure.add_subplot()
    # A log axis cannot show FAR = 0, so those points sit at a tenth of the smallest step.
    floor = 0.1 / max(1, int((~is_same.bool()).sum()))
    axes.plot(fpr.clamp_min(floor).numpy(), tpr.numpy(), drawstyle="steps-post")
    axes.set_xscale("log")
    axes.set_xlim(floor, 1.0)
    axes.set_ylim(0.0, 1.01)
    axes.set_xlabel("false accept rate")
    axes.set_ylabel("true accept rate")
    axes.set_title(
        f"accuracy {metrics['accuracy']:.4f}, AUC {metrics['auc']:.4f}", fontsize="medium"
    )
    axes.grid(True, which="both", alpha=0.3)
    return figure
