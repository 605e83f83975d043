"""Log matplotlib figures as images to every logger of a Trainer."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


@rank_zero_only
def log_figure(trainer: pl.Trainer, key: str, figure: Figure, close: bool = True) -> None:
    """Log ``figure`` under ``key`` on rank zero.

    Weights & Biases receives it as an image. Every logger with a local ``log_dir``
    (the CSV logger among them) gets a PNG file ``figures/{key}-step{N}.png`` in that
    folder, so the figure is also kept when Weights & Biases is disabled.
    """
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    if close:
        plt.close(figure)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    step = trainer.global_step
    safe_key = key.replace("/", "_")
    for run_logger in trainer.loggers:
        if isinstance(run_logger, WandbLogger):
            run_logger.log_image(key=key, images=[image], step=step)
        elif isinstance(run_logger, CSVLogger) or getattr(run_logger, "log_dir", None):
            folder = Path(run_logger.log_dir) / "figures"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{safe_key}-step{step}.png")
