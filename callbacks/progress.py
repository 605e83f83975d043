"""Line-based progress reporting for runs whose output is not a terminal."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info


class LineProgress(ProgressBar):
    """Report training progress as plain log lines instead of a redrawn bar.

    A line is written about every ``every_n_percent`` of an epoch's batches and at the
    end of each epoch with the metrics shown on the progress bar, so logs of batch jobs
    and CI stay readable.

    Args:
        every_n_percent: spacing between lines within an epoch, in percent (1 to 100).
    """

    def __init__(self, every_n_percent: int = 25) -> None:
        super().__init__()
        if not 1 <= every_n_percent <= 100:
            raise ValueError(f"every_n_percent must be in [1, 100], got {every_n_percent}.")
        self.every_n_percent = every_n_percent
        self._enabled = True
        self._epoch_start = 0.0
        self._next_report = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.monotonic()
        self._next_report = self.every_n_percent

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        total = self.total_train_batches
        if not self._enabled or not isinstance(total, int) or total <= 0:
            return
        done = batch_idx + 1
        percent = 100 * done // total
        if percent >= self._next_report and done < total:
            self._next_report = (percent // self.every_n_percent + 1) * self.every_n_percent
            rank_zero_info(
                f"epoch {trainer.current_epoch} {done}/{total} batches "
                f"({time.monotonic() - self._epoch_start:.1f} s) {self._format_metrics(trainer)}"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled:
            rank_zero_info(
                f"epoch {trainer.current_epoch} done in {time.monotonic() - self._epoch_start:.1f} s "
                f"{self._format_metrics(trainer)}"
            )

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking:
            rank_zero_info(f"validation: {self._format_metrics(trainer)}")

    def _format_metrics(self, trainer: pl.Trainer) -> str:
        parts = []
        for key, value in sorted(trainer.callback_metrics.items()):
            if value.numel() == 1:
                parts.append(f"{key}={value.item():.4g}")
        return " ".join(parts)
