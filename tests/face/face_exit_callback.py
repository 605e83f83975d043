"""A callback that ends the process abruptly, used to test resuming an interrupted run."""

from __future__ import annotations

import os

import lightning.pytorch as pl


class ExitAtStep(pl.Callback):
    """Call ``os._exit(3)`` after the optimizer step that reaches ``step``.

    ``os._exit`` skips every cleanup and checkpoint hook, like a killed process.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            os._exit(3)
