"""Per-epoch logging of neural-ODE solver statistics, with a figure of NFE over training."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl

from zoo.callbacks.figures import log_figure

logger = logging.getLogger(__name__)


class ODEStatsCallback(pl.Callback):
    """Average the solver statistics of every batch and log them once per epoch.

    The module must keep the statistics of its latest solve in an attribute ``ode_stats``
    (a dict of floats such as ``nfe``, ``n_accepted``, ``n_rejected``, ``reg/<term>``), as
    the models in ``zoo.ode`` do. Each epoch logs ``ode/<stage>_<key>`` for the stages
    ``train``, ``val`` and ``test``, averaged over batches and, under DDP, over processes.
    At the end of every training epoch a figure ``ode/nfe`` plots the mean training and
    validation NFE per epoch so far.

    Args:
        plot: Log the NFE figure at the end of each training epoch.
    """

    def __init__(self, plot: bool = True) -> None:
        super().__init__()
        self.plot = plot
        self._sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._counts: dict[str, int] = defaultdict(int)
        self.history: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}

    def _accumulate(self, stage: str, pl_module: pl.LightningModule) -> None:
        stats = getattr(pl_module, "ode_stats", None)
        if not stats:
            return
        for key, value in stats.items():
            self._sums[stage][key] += float(value)
        self._counts[stage] += 1

    def _log_epoch(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count = self._counts.pop(stage, 0)
        sums = self._sums.pop(stage, {})
        if count == 0:
            return
        for key, total in sums.items():
            name = f"ode/{stage}_{key.replace('/', '_')}"
            pl_module.log(name, total / count, on_epoch=True, sync_dist=True)
        if stage in self.history and "nfe" in sums and not trainer.sanity_checking:
            self.history[stage].append((trainer.current_epoch, sums["nfe"] / count))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._accumulate("train", pl_module)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if not trainer.sanity_checking:
            self._accumulate("val", pl_module)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        self._accumulate("test", pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_epoch("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_epoch("test", trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_epoch("train", trainer, pl_module)
        if self.plot and self.history["train"] and trainer.is_global_zero:
            log_figure(trainer, "ode/nfe", self.nfe_figure())

    def nfe_figure(self) -> Any:
        """Return a matplotlib figure of mean NFE per epoch (training and validation)."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        figure, axes = plt.subplots(figsize=(5, 3.5))
        for stage, points in self.history.items():
            if points:
                epochs, values = zip(*points, strict=True)
                axes.plot(epochs, values, marker="o", label=stage)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("mean NFE per batch")
        axes.set_title("Function evaluations of the ODE solver")
        axes.legend()
        axes.grid(alpha=0.3)
        figure.tight_layout()
        return figure

    def state_dict(self) -> dict[str, Any]:
        return {"history": {stage: list(points) for stage, points in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        history = state_dict.get("history", {})
        self.history = {
            stage: [tuple(point) for point in history.get(stage, [])] for stage in ("train", "val")
        }
